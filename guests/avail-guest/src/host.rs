//! The optional host imports of module `avail`. Each one becomes an import of the
//! module only if the guest calls it. Off `wasm32` (host-side tests) they are stubs:
//! `log` prints to stderr, `now_ms` reads the system clock, `random` is a fixed stream.

#[cfg(target_arch = "wasm32")]
mod sys {
    #[link(wasm_import_module = "avail")]
    unsafe extern "C" {
        pub fn log(ptr: *const u8, len: usize);
        pub fn now_ms() -> i64;
        pub fn random(ptr: *mut u8, len: usize);
    }
}

/// Appends one line to the workload's log.
pub fn log(line: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host reads `len` bytes at `ptr`, which `line` keeps alive.
    unsafe {
        sys::log(line.as_ptr(), line.len())
    }
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[guest log] {line}");
}

/// Milliseconds since the Unix epoch on the host's (replay-safe) virtual clock.
pub fn now_ms() -> i64 {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: no arguments, no memory access.
    unsafe {
        sys::now_ms()
    }
    #[cfg(not(target_arch = "wasm32"))]
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Fills `buf` from the instance's seeded (replay-safe) random stream.
pub fn random(buf: &mut [u8]) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host writes `len` bytes at `ptr`, which `buf` owns.
    unsafe {
        sys::random(buf.as_mut_ptr(), buf.len())
    }
    #[cfg(not(target_arch = "wasm32"))]
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(151).wrapping_add(17);
    }
}

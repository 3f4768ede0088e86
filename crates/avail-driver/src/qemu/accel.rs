//! Which accelerator qemu gets on this host: KVM where it runs Linux guests, else TCG
//! (software emulation). Probed once, when the driver is made.
//!
//! `/dev/kvm` opening is not enough: a nested software hypervisor (PVM) offers
//! `/dev/kvm` without the CPU's virtualisation extensions, and a Linux guest hangs under
//! it. So KVM is taken only when `/dev/kvm` opens read-write and the CPU flags name
//! `vmx` (Intel) or `svm` (AMD).

/// An accelerator for qemu's `-accel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (slower, always there).
    Tcg,
}

impl Accel {
    /// qemu's name for it, and the node tag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Probe this host.
    pub fn probe() -> Accel {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Accel::choose(kvm, &cpuinfo)
    }

    /// The choice from whether `/dev/kvm` opens and the text of `/proc/cpuinfo`.
    pub fn choose(kvm_opens: bool, cpuinfo: &str) -> Accel {
        let extensions = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if kvm_opens && extensions {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_needs_the_device_and_the_cpu_extensions() {
        let vmx = "processor : 0\nflags : fpu vme vmx sse\n";
        let none = "processor : 0\nflags : fpu vme sse hypervisor\n";
        assert_eq!(Accel::choose(true, vmx), Accel::Kvm);
        assert_eq!(Accel::choose(true, "flags : svm lm\n"), Accel::Kvm);
        assert_eq!(
            Accel::choose(true, none),
            Accel::Tcg,
            "PVM: a device, no extensions"
        );
        assert_eq!(Accel::choose(false, vmx), Accel::Tcg);
        // A flag named like one is not one.
        assert_eq!(Accel::choose(true, "flags : vmx_ept\n"), Accel::Tcg);
    }
}

//! Restore-then-run equals just-run: for random request sequences against the example
//! guests, checkpoint at random points (through the frame encoding, applied to a
//! secondary's image), "kill" the primary at a random point, restore the last checkpoint
//! into a fresh instance and replay the requests after it; every reply equals the
//! uninterrupted run's.

use avail_statepoint::capture::{Capturer, restore};
use avail_statepoint::dirty::shadow::ShadowTracker;
use avail_statepoint::frame::{self, Frame};
use avail_statepoint::rewrite::{self, START_EXPORT};
use avail_statepoint::state::StateImage;
use proptest::prelude::*;
use wasmtime::{Engine, Instance, Linker, Module, Store};

fn guest(name: &str) -> Vec<u8> {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../guests/{name}.wasm"));
    std::fs::read(p).unwrap()
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Call the guest (ABI v1) and return status and body.
fn call(
    store: &mut Store<()>,
    inst: &Instance,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u32, Vec<u8>) {
    let mut req = Vec::new();
    put_bytes(&mut req, method.as_bytes());
    put_bytes(&mut req, path.as_bytes());
    req.extend_from_slice(&0u32.to_le_bytes());
    put_bytes(&mut req, body);
    let alloc = inst
        .get_typed_func::<i32, i32>(&mut *store, "avail_alloc")
        .unwrap();
    let handle = inst
        .get_typed_func::<(i32, i32), i64>(&mut *store, "avail_handle")
        .unwrap();
    let mem = inst.get_memory(&mut *store, "memory").unwrap();
    let ptr = alloc.call(&mut *store, req.len() as i32).unwrap();
    mem.write(&mut *store, ptr as usize, &req).unwrap();
    let packed = handle.call(&mut *store, (ptr, req.len() as i32)).unwrap() as u64;
    let (rp, rl) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
    let resp = mem.data(&*store)[rp..rp + rl].to_vec();
    let status = u32::from_le_bytes(resp[..4].try_into().unwrap());
    let headers = u32::from_le_bytes(resp[4..8].try_into().unwrap());
    let mut at = 8;
    for _ in 0..headers * 2 {
        let n = u32::from_le_bytes(resp[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + n;
    }
    let n = u32::from_le_bytes(resp[at..at + 4].try_into().unwrap()) as usize;
    (status, resp[at + 4..at + 4 + n].to_vec())
}

#[derive(Clone, Debug)]
enum Op {
    Transfer(u8, u8, u16),
    Balances,
    Put(u8, u16, u8),
    Get(u8),
    Delete(u8),
    Stats,
}

impl Op {
    fn request(&self) -> (&'static str, String, Vec<u8>) {
        match self {
            Op::Transfer(f, t, a) => (
                "POST",
                "/transfer".into(),
                format!(r#"{{"from":{},"to":{},"amount":{}}}"#, f % 100, t % 100, a).into_bytes(),
            ),
            Op::Balances => ("GET", "/balances".into(), vec![]),
            // Values up to 20 KiB: several pages dirtied per write.
            Op::Put(k, len, b) => (
                "PUT",
                format!("/kv/key{}", k % 16),
                vec![*b; *len as usize % 20_000],
            ),
            Op::Get(k) => ("GET", format!("/kv/key{}", k % 16), vec![]),
            Op::Delete(k) => ("DELETE", format!("/kv/key{}", k % 16), vec![]),
            Op::Stats => ("GET", "/stats".into(), vec![]),
        }
    }
}

struct Guest {
    engine: Engine,
    original: Module,
    rewritten: Module,
    layout: rewrite::StateLayout,
}

impl Guest {
    fn load(name: &str) -> Guest {
        let engine = Engine::default();
        let bytes = guest(name);
        let rw = rewrite::rewrite(&bytes).unwrap();
        Guest {
            original: Module::new(&engine, &bytes).unwrap(),
            rewritten: Module::new(&engine, &rw.bytes).unwrap(),
            layout: rw.layout,
            engine,
        }
    }

    fn instance(&self, module: &Module) -> (Store<()>, Instance) {
        let mut store = Store::new(&self.engine, ());
        let inst = Linker::new(&self.engine)
            .instantiate(&mut store, module)
            .unwrap();
        if let Some(start) = inst.get_func(&mut store, START_EXPORT) {
            start.call(&mut store, &[], &mut []).unwrap();
        }
        (store, inst)
    }

    /// Run `ops` with checkpoints after the ops flagged in `cps`, kill after op `kill`,
    /// restore the last checkpoint elsewhere and replay from there; compare every reply
    /// with the uninterrupted run's.
    fn check(&self, ops: &[Op], cps: &[bool], kill: usize) {
        let (mut rs, ri) = self.instance(&self.original);
        let reference: Vec<_> = ops
            .iter()
            .map(|o| {
                let (m, p, b) = o.request();
                call(&mut rs, &ri, m, &p, &b)
            })
            .collect();

        let (mut ps, pi) = self.instance(&self.rewritten);
        let mut capturer =
            Capturer::new(self.layout.clone(), || Box::new(ShadowTracker::default()));
        let mut secondary = StateImage::default();
        // The initial state is checkpoint 0 (the secondary is synced before serving).
        let mut last_cp = 0;
        let mut epoch = 0;
        let mut ship = |capturer: &mut Capturer, ps: &mut Store<()>, secondary: &mut StateImage| {
            epoch += 1;
            let delta = capturer
                .capture(&mut *ps, &pi, format!("host{epoch}").into_bytes())
                .unwrap();
            let wire = frame::encode(&Frame {
                workload: "w".into(),
                generation: 1,
                epoch,
                delta,
            })
            .unwrap();
            secondary
                .apply(&frame::decode(&wire).unwrap().delta)
                .unwrap();
        };
        ship(&mut capturer, &mut ps, &mut secondary);
        for (i, op) in ops.iter().enumerate().take(kill) {
            let (m, p, b) = op.request();
            assert_eq!(
                call(&mut ps, &pi, m, &p, &b),
                reference[i],
                "primary op {i}"
            );
            if cps[i] {
                ship(&mut capturer, &mut ps, &mut secondary);
                last_cp = i + 1;
            }
        }
        // The secondary's image is the primary's state at the last checkpoint.
        let (mut ss, si) = self.instance(&self.rewritten);
        restore(&mut ss, &si, &self.layout, &secondary).unwrap();
        for (i, op) in ops.iter().enumerate().skip(last_cp) {
            let (m, p, b) = op.request();
            assert_eq!(
                call(&mut ss, &si, m, &p, &b),
                reference[i],
                "after failover, op {i} (checkpoint after op {last_cp})"
            );
        }
    }
}

fn bank_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<u8>(), any::<u8>(), 1u16..1500).prop_map(|(f, t, a)| Op::Transfer(f, t, a)),
        1 => Just(Op::Balances),
    ]
}

fn kv_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), any::<u16>(), any::<u8>()).prop_map(|(k, l, b)| Op::Put(k, l, b)),
        2 => any::<u8>().prop_map(Op::Get),
        1 => any::<u8>().prop_map(Op::Delete),
        1 => Just(Op::Stats),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn bank_restore_then_run_equals_run(ops in prop::collection::vec(bank_op(), 1..60), cps in prop::collection::vec(any::<bool>(), 60), kill in any::<prop::sample::Index>()) {
        thread_local!(static G: Guest = Guest::load("bank"));
        G.with(|g| g.check(&ops, &cps, kill.index(ops.len() + 1)));
    }

    #[test]
    fn kv_restore_then_run_equals_run(ops in prop::collection::vec(kv_op(), 1..60), cps in prop::collection::vec(any::<bool>(), 60), kill in any::<prop::sample::Index>()) {
        thread_local!(static G: Guest = Guest::load("kv"));
        G.with(|g| g.check(&ops, &cps, kill.index(ops.len() + 1)));
    }
}

#[test]
fn counter_survives_a_restore() {
    let g = Guest::load("counter");
    let ops: Vec<Op> = vec![];
    g.check(&ops, &[], 0);
    let (mut ps, pi) = g.instance(&g.rewritten);
    for _ in 0..5 {
        call(&mut ps, &pi, "POST", "/incr", b"");
    }
    let mut c = Capturer::new(g.layout.clone(), || Box::new(ShadowTracker::default()));
    let mut img = StateImage::default();
    img.apply(&c.capture(&mut ps, &pi, vec![]).unwrap())
        .unwrap();
    let (mut ss, si) = g.instance(&g.rewritten);
    restore(&mut ss, &si, &g.layout, &img).unwrap();
    assert_eq!(
        call(&mut ss, &si, "POST", "/incr", b"").1,
        br#"{"value":6}"#
    );
}

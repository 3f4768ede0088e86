//! Virtual machines (issue 13, first increment): the `qemu` driver boots the VM test
//! guest (`scripts/build-vm-guest.sh`: a Debian kernel and a busybox initramfs serving
//! the counter interface), routes the ingress to it, restarts it elsewhere at level
//! `ha` when its host dies (booted afresh: no VM checkpoints yet), and reports a VM that
//! cannot boot with qemu's reason.

use std::time::{Duration, Instant};

use avail_model::{Phase, Workload};
use avail_testkit::{Cluster, ok};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

/// On node-1: tokyo is node-1 and node-3, and pack ties to the first name.
const ON_NODE_1: &[&str] = &["--constraint", "zone == tokyo", "--policy", "pack"];

/// TCG boots the guest in about 5 s alone; three agents and the tests share 2 cores.
const BOOT: Duration = Duration::from_secs(90);

async fn running(c: &Cluster, name: &str, not: Option<&str>) -> Workload {
    c.wait_workload(name, "running", BOOT, |w| {
        if w.status.phase == Phase::Running && w.status.node.as_deref() != not {
            Ok(w.clone())
        } else {
            Err(format!("{:?}", w.status))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_serves_the_counter_and_restarts_elsewhere_when_its_host_dies() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    let mut args = vec!["--level", "ha"];
    args.extend_from_slice(ON_NODE_1);
    ok(&c.run_vm("vm", 128, &args));
    let w = running(&c, "vm", None).await;
    let victim = w.status.node.clone().unwrap();
    assert_eq!(victim, "node-1", "{:?}", w.status);
    // Placed where the agent said it runs VMs.
    let api = c.client();
    let n: avail_model::Node = api.get(&format!("/v1/nodes/{victim}")).await.unwrap();
    assert!(
        matches!(n.tags.get("vm").map(String::as_str), Some("tcg" | "kvm")),
        "{:?}",
        n.tags
    );
    // The counter, through the ingress of another node.
    let ingress = avail_client::Client::new(&c.ingress(1), None, None);
    for want in [1, 2] {
        let r = ingress
            .raw(Method::POST, "/w/vm/incr", None, &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["value"], want);
        assert_eq!(r.headers.get("avail-node").unwrap(), "node-1");
    }
    // The serial console is the workload's log.
    let logs: serde_json::Value = api.get("/v1/workloads/vm/logs").await.unwrap();
    assert!(
        logs.to_string()
            .contains("avail-vm-guest: serving the counter"),
        "{logs}"
    );

    // Its host dies: the VM boots again on node-3 (the other tokyo node).
    let killed = Instant::now();
    c.kill_agent(0);
    let w = running(&c, "vm", Some(&victim)).await;
    assert_eq!(w.status.node.as_deref(), Some("node-3"), "{:?}", w.status);
    assert_eq!(w.status.incarnation, 2, "{:?}", w.status);
    let r = ingress
        .raw(Method::GET, "/w/vm/value", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers.get("avail-node").unwrap(), "node-3");
    assert_eq!(r.headers.get("avail-incarnation").unwrap(), "2");
    eprintln!(
        "the VM answered on node-3 {:.1} s after its host's SIGKILL",
        killed.elapsed().as_secs_f64()
    );

    // Its level changes at run time, without a restart: ha -> none -> ha (no other
    // tokyo node is left to hold its restart capacity: not waited for).
    for level in ["none", "ha"] {
        ok(&c.cli(&["workload", "set-level", "vm", level, "--no-wait"]));
        let w: Workload = api.get("/v1/workloads/vm").await.unwrap();
        assert_eq!(w.spec.level.as_str(), level);
        assert_eq!(w.status.incarnation, 2, "no restart: {:?}", w.status);
        assert_eq!(w.status.phase, Phase::Running, "{:?}", w.status);
    }
    let r = ingress
        .raw(Method::POST, "/w/vm/incr", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers.get("avail-incarnation").unwrap(), "2");
    // ft is refused, naming the field and why.
    let out = c.cli(&["workload", "set-level", "vm", "ft"]);
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("level") && said.contains("qemu"), "{said}");

    // Removed: the power button over QMP, and the guest powers off well within the
    // grace before a kill (10 s).
    let qemu_of_vm = || {
        std::process::Command::new("pgrep")
            .args(["-f", "qemu-system-x86_64 -name vm "])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false)
    };
    assert!(qemu_of_vm(), "the VM's qemu runs");
    let removed = Instant::now();
    ok(&c.cli(&["workload", "rm", "vm"]));
    while qemu_of_vm() {
        assert!(
            removed.elapsed() < Duration::from_secs(8),
            "qemu still runs: the guest did not power off on the button"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the VM powered off {:.2} s after its removal",
        removed.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_cannot_boot_is_reported_with_qemus_reason() {
    let c = Cluster::start(BIN.as_ref(), 1).await;
    // A "kernel" that is not one.
    let bad = c.dir.path().join("not-a-kernel");
    std::fs::write(&bad, b"this is not a Linux kernel\n").unwrap();
    let spec = c.dir.path().join("bad.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"bad\"\ndriver = \"qemu\"\nartifact = \"{}\"\n[resources]\nmemory_mib = 128\n",
            bad.display()
        ),
    )
    .unwrap();
    // The CLI waits for it to run, and says why it does not, in qemu's words.
    let out = c.cli(&[
        "workload",
        "run",
        "-f",
        &spec.display().to_string(),
        "--timeout-s",
        "15",
    ]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("qemu: invalid kernel header"), "{said}");
    // And so does its status.
    let why = c
        .wait_workload("bad", "qemu's reason", BOOT, |w| match &w.status.message {
            Some(m) if m.contains("qemu") => Ok(m.clone()),
            _ => Err(format!("{:?}", w.status)),
        })
        .await;
    assert!(why.contains("invalid kernel header"), "{why}");
}

//! VMs (issue 13): boot to the first reply through the ingress, and an `ha` VM's
//! restart after SIGKILL of its host (to the first reply from its new node), against a
//! baseline in the same run: the same qemu command started by hand, to the first reply
//! on its forwarded port. The guest is the VM test guest
//! (`scripts/build-vm-guest.sh`: a Debian kernel and a busybox initramfs serving the
//! counter). A fresh 3-agent cluster per trial; the VM is placed on node-1 (tokyo, pack)
//! and restarts on node-3 (the other tokyo node).
//!
//! `cargo build --release -p avail -p avail-bench && target/release/vm_boot [trials]`

use std::time::{Duration, Instant};

use avail_bench::{machine, median};
use avail_client::Client;
use avail_model::Workload;
use avail_testkit::{Cluster, vm_guest};
use hyper::Method;

/// The first 200 from `GET <base>/value` (polling every 20 ms); when it came.
async fn first_reply(api: &Client, path: &str, deadline: Duration) -> Instant {
    let start = Instant::now();
    loop {
        if let Ok(r) = api.raw(Method::GET, path, None, &[]).await
            && r.status == 200
        {
            return Instant::now();
        }
        assert!(
            start.elapsed() < deadline,
            "no reply from {path} within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The baseline: qemu started by hand with the driver's arguments (TCG here), to the
/// first reply on its forwarded port, seconds.
async fn bare_boot(g: &avail_testkit::VmGuest, accel: &str) -> f64 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let accel = if accel == "tcg" {
        "tcg,tb-size=64".to_string()
    } else {
        accel.to_string()
    };
    let t = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            &accel,
            "-m",
            "128",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot", "-kernel"])
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1",
            "-serial",
            "null",
            "-netdev",
        ])
        .arg(format!(
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:80"
        ))
        .args(["-device", "virtio-net-pci,netdev=net0"])
        .current_dir(dir.path())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64");
    // Short tries: before the guest listens, qemu's user network holds a connection
    // while it retries the guest (a long wait would hide the moment it is up).
    let api = Client::new(&format!("http://127.0.0.1:{port}"), None, None)
        .with_timeout(Duration::from_millis(300));
    let at = first_reply(&api, "/value", Duration::from_secs(60)).await;
    let _ = child.kill().await;
    (at - t).as_secs_f64()
}

fn main() {
    let trials: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    let g = vm_guest();
    println!("machine: {}", machine());
    rt.block_on(async move {
        let (mut bare, mut boot, mut restart) = (Vec::new(), Vec::new(), Vec::new());
        let mut accel = String::new();
        for t in 0..trials {
            // The baseline first, on a quiet machine (no cluster yet).
            bare.push(bare_boot(&g, if accel.is_empty() { "tcg" } else { &accel }).await);
            let mut c = Cluster::start(&bin, 3).await;
            let api = c.client();
            let n: avail_model::Node = api.get("/v1/nodes/node-1").await.unwrap();
            accel = n.tags.get("vm").cloned().unwrap_or_default();
            let mut digests = Vec::new();
            for f in [&g.kernel, &g.initrd] {
                let up: serde_json::Value = api
                    .put_bytes("/v1/artifacts", std::fs::read(f).unwrap().into())
                    .await
                    .unwrap();
                digests.push(up["digest"].as_str().unwrap().to_string());
            }
            let spec = serde_json::json!({
                "name": "vm", "driver": "qemu", "artifact": digests[0], "level": "ha",
                "resources": {"cpu_millis": 500, "memory_mib": 128},
                "placement": {"constraints": ["zone == tokyo"], "policy": "pack"},
                "vm": {"initrd": digests[1]},
            });
            let ingress = Client::new(&c.ingress(1), None, None);
            let created = Instant::now();
            let w: Workload = api.post("/v1/workloads", &spec).await.unwrap();
            assert_eq!(w.status.node.as_deref(), Some("node-1"), "{:?}", w.status);
            let up = first_reply(&ingress, "/w/vm/value", Duration::from_secs(120)).await;
            boot.push((up - created).as_secs_f64());
            let killed = Instant::now();
            c.kill_agent(0);
            let back = first_reply(&ingress, "/w/vm/value", Duration::from_secs(120)).await;
            restart.push((back - killed).as_secs_f64());
            drop(c);
            println!(
                "trial {t}: boot {:.2} s (bare qemu {:.2} s), ha restart {:.2} s",
                boot[t], bare[t], restart[t]
            );
        }
        let (b, q, r) = (median(boot.clone()), median(bare.clone()), median(restart.clone()));
        println!(
            "{trials} trials, accel {accel}: boot to first reply through the ingress median {b:.2} s \
             (bare qemu {q:.2} s, ratio {:.2}); ha restart after SIGKILL of the host median {r:.2} s \
             (max {:.2} s)",
            b / q,
            restart.iter().cloned().fold(0.0, f64::max)
        );
    });
}

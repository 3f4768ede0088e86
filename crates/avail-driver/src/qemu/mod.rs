//! The `qemu` driver: a virtual machine booted from a kernel (and initrd), serving HTTP
//! on a guest port.
//!
//! A VM is one `qemu-system-x86_64` process, run by the [`process`](crate::process)
//! driver: the same containment (its own uid, private working directory, cgroup),
//! the same shim (it dies with the agent), restarts with backoff, and the same HTTP
//! proxy, to the loopback port qemu forwards to the guest's port. What this driver
//! adds:
//!
//! - **The command line** ([`command`]): the accelerator probed at start ([`Accel`]:
//!   KVM where Linux guests run, else TCG), memory and vCPUs from the spec, the
//!   kernel, initrd and command line, the serial console on stdout (the workload's
//!   log), user-mode networking with `restrict=on` (the guest reaches nothing of the
//!   host but the forwarded port), qemu's seccomp sandbox, and a QMP socket in the
//!   instance's private directory.
//! - **The files**: the kernel and initrd, fetched and checked by the agent, are shared
//!   read-only with the instance's uid ([`Containment::shared_file`](crate::contain::Containment::shared_file)).
//! - **Boot**: the instance is `starting` until the guest answers HTTP on its port (qemu
//!   accepts on the forwarded port long before the guest listens).
//! - **Clean shutdown**: stopping presses the ACPI power button over QMP and gives the
//!   guest [`SHUTDOWN_GRACE`] to power off before qemu is killed.
//! - **A VM that cannot boot** is reported with qemu's reason: its last line on stderr
//!   is in the status message of the exit.
//!
//! Capabilities: no checkpoints, no live migration, no `ft` yet (`docs/vms.md`). Level
//! `ha` restarts a VM elsewhere, booted afresh.

pub mod accel;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use avail_model::agent::InstanceState;
use avail_model::{DriverKind, WorkloadSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use accel::Accel;

use crate::process::{ProcessDriver, ProcessInstance};
use crate::{
    Capabilities, Driver, HttpRequest, HttpResponse, Instance, InstanceStatus, StartError,
    StartSpec,
};

/// The qemu binary looked for on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Memory qemu itself needs beyond the guest's RAM, MiB: added to the instance's
/// memory limit (not to what the scheduler counts).
pub const QEMU_OVERHEAD_MIB: u32 = 256;
/// How long a guest has to power off after the ACPI power button before it is killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The QMP socket, in the instance's private directory.
pub const QMP_SOCKET: &str = "qmp.sock";

/// The `qemu` driver.
pub struct QemuDriver {
    process: ProcessDriver,
    binary: PathBuf,
    accel: Accel,
}

impl QemuDriver {
    /// The driver, running VMs through `process` (its containment and shim), when
    /// qemu is installed (`None` otherwise), with the accelerator this host has.
    pub fn probe(process: ProcessDriver) -> Option<QemuDriver> {
        let binary = find_on_path(QEMU_BINARY)?;
        Some(QemuDriver {
            process,
            binary,
            accel: Accel::probe(),
        })
    }

    /// The accelerator VMs would get on this host, when qemu is installed.
    pub fn host_accel() -> Option<Accel> {
        find_on_path(QEMU_BINARY).map(|_| Accel::probe())
    }
}

/// `name` in a directory of `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| crate::process::DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The files a VM boots from, as the instance sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFiles {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initial RAM disk.
    pub initrd: Option<PathBuf>,
}

/// qemu's arguments for `spec` (its `vm`, memory and name) booting `files` with
/// `accel`, its QMP socket at `qmp`; `$PORT` is the host port forwarded to the guest's.
pub fn command(spec: &WorkloadSpec, files: &BootFiles, accel: Accel, qmp: &Path) -> Vec<String> {
    let vm = spec.vm.clone().unwrap_or_default();
    let mut args: Vec<String> = vec![
        "-name".into(),
        spec.name.clone(),
        "-accel".into(),
        accel_option(accel),
        "-m".into(),
        spec.resources.memory_mib.to_string(),
        "-smp".into(),
        vm.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-kernel".into(),
        files.kernel.display().to_string(),
    ];
    if let Some(i) = &files.initrd {
        args.extend(["-initrd".into(), i.display().to_string()]);
    }
    args.extend([
        "-append".into(),
        vm.cmdline.clone(),
        "-serial".into(),
        "stdio".into(),
        "-netdev".into(),
        format!(
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:$PORT-:{}",
            vm.port
        ),
        "-device".into(),
        "virtio-net-pci,netdev=net0".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    args
}

/// TCG's translation cache, MiB: qemu's default (1 GiB) would not fit the instance's
/// memory limit (`RLIMIT_DATA` where there is no memory cgroup).
pub const TCG_CACHE_MIB: u32 = 64;

/// The `-accel` option for `accel`.
fn accel_option(accel: Accel) -> String {
    match accel {
        Accel::Kvm => "kvm".into(),
        Accel::Tcg => format!("tcg,tb-size={TCG_CACHE_MIB}"),
    }
}

#[async_trait]
impl Driver for QemuDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Qemu
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }

    async fn start(&self, start: StartSpec<'_>) -> Result<Arc<dyn Instance>, StartError> {
        let spec = start.spec;
        let vm = spec.vm.clone().unwrap_or_default();
        let contain = self.process.containment();
        let share = |digest: &str, what: &str| -> Result<PathBuf, StartError> {
            let src = start.files.get(digest).ok_or_else(|| {
                StartError::InvalidArtifact(format!("the {what} {digest} was not fetched"))
            })?;
            contain
                .shared_file(&digest.replace(':', "-"), src)
                .map_err(|e| StartError::Start(format!("sharing the {what}: {e}")))
        };
        let files = BootFiles {
            kernel: share(&spec.artifact, "kernel")?,
            initrd: vm
                .initrd
                .as_deref()
                .map(|d| share(d, "initrd"))
                .transpose()?,
        };
        // The QMP socket goes in the instance's private directory, known once it is
        // made: qemu is given a relative path, resolved in its working directory.
        let mut proc_spec = spec.clone();
        proc_spec.driver = DriverKind::Process;
        proc_spec.artifact = self.binary.display().to_string();
        proc_spec.args = command(spec, &files, self.accel, Path::new(QMP_SOCKET));
        proc_spec.env.clear();
        proc_spec.vm = None;
        proc_spec.resources.memory_mib = spec.resources.memory_mib + QEMU_OVERHEAD_MIB;
        (start.logs)(format!(
            "avail: booting {} with {} ({} MiB, {} vCPU)",
            files.kernel.display(),
            self.accel.as_str(),
            spec.resources.memory_mib,
            vm.vcpus
        ));
        let inner = self
            .process
            .start_process(StartSpec {
                spec: &proc_spec,
                module: None,
                files: Default::default(),
                logs: start.logs.clone(),
            })
            .await?;
        let qmp = inner
            .workdir()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let booted = Arc::new(AtomicBool::new(false));
        tokio::spawn(watch_boot(
            Arc::downgrade(&inner),
            booted.clone(),
            start.logs.clone(),
        ));
        Ok(Arc::new(QemuInstance { inner, qmp, booted }))
    }
}

/// Whether something answers HTTP on `127.0.0.1:port` (any status).
async fn answers_http(port: u16) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/")
    };
    // Short: before the guest listens, qemu's user network holds a connection while
    // it retries the guest, and a long wait here would hold the boot up with it.
    tokio::time::timeout(Duration::from_millis(500), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Follow whether the guest of `inner` answers: `booted` from its first answer until
/// its qemu is not running (a restart boots again).
async fn watch_boot(
    inner: std::sync::Weak<ProcessInstance>,
    booted: Arc<AtomicBool>,
    logs: crate::LogSink,
) {
    let mut since = Instant::now();
    loop {
        let Some(i) = inner.upgrade() else { return };
        let running = i.status().state == InstanceState::Running;
        let port = i.port();
        drop(i);
        if !running {
            if booted.swap(false, Ordering::AcqRel) {
                since = Instant::now();
            }
        } else if !booted.load(Ordering::Acquire) && answers_http(port).await {
            booted.store(true, Ordering::Release);
            logs(format!(
                "avail: the guest answers on its port after {} ms",
                since.elapsed().as_millis()
            ));
        }
        let pause = if booted.load(Ordering::Acquire) {
            500
        } else {
            100
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// One VM.
pub struct QemuInstance {
    inner: Arc<ProcessInstance>,
    /// The directory of its QMP socket ([`QMP_SOCKET`]): its private working directory.
    qmp: PathBuf,
    booted: Arc<AtomicBool>,
}

#[async_trait]
impl Instance for QemuInstance {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        if !self.booted.load(Ordering::Acquire) {
            return HttpResponse::error(503, "starting", "the VM is booting");
        }
        self.inner.handle(req).await
    }

    fn status(&self) -> InstanceStatus {
        let mut s = self.inner.status();
        if s.state == InstanceState::Running && !self.booted.load(Ordering::Acquire) {
            s.state = InstanceState::Starting;
            if s.message.is_none() {
                s.message = Some("booting".into());
            }
        }
        s
    }

    async fn stop(&self) {
        let qmp = self.qmp.clone();
        self.inner
            .stop_gracefully(SHUTDOWN_GRACE, async move {
                match qmp::Qmp::connect(&qmp, QMP_SOCKET).await {
                    Ok(mut q) => {
                        if let Err(e) = q.powerdown().await {
                            tracing::warn!("VM power button: {e}");
                        }
                    }
                    Err(e) => tracing::debug!("VM power button: {e}"),
                }
            })
            .await;
    }
}

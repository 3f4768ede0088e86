//! The workload spec (TOML or JSON, same fields) and its validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Constraint, ValidationError};

/// Which driver runs the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// A core wasm module (guest ABI v1) run by wasmtime.
    Wasm,
    /// A host process listening on `$PORT`.
    Process,
    /// A qemu virtual machine booted from a kernel (and initrd), serving HTTP on a
    /// guest port.
    Qemu,
}

impl DriverKind {
    /// The spec spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Wasm => "wasm",
            DriverKind::Process => "process",
            DriverKind::Qemu => "qemu",
        }
    }
}

/// The availability level of a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fault tolerant: a secondary kept in step by checkpoint replication.
    Ft,
    /// Highly available: restarted elsewhere onto reserved capacity.
    Ha,
    /// Best effort.
    #[default]
    None,
}

impl Level {
    /// The spec spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ft => "ft",
            Level::Ha => "ha",
            Level::None => "none",
        }
    }

    /// Protection order: none < ha < ft.
    pub fn rank(self) -> u8 {
        match self {
            Level::None => 0,
            Level::Ha => 1,
            Level::Ft => 2,
        }
    }

    /// The higher of two levels.
    pub fn max(self, other: Level) -> Level {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

/// The cluster's level policy (`GET`/`PUT /v1/cluster/levels`), so protection is not
/// forgotten: a default for specs that name no level, and minimum levels by node tag
/// (`compliance=pci` at least `ha`) for workloads placed on such nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LevelPolicy {
    /// The level of a workload whose spec has no `level`.
    #[serde(default)]
    pub default: Level,
    /// Minimum levels by node tag.
    #[serde(default)]
    pub minimums: Vec<LevelMinimum>,
}

/// A minimum level for the workloads on nodes with a tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LevelMinimum {
    /// The node tag, `key=value`.
    pub tag: String,
    /// The lowest level a workload on such a node may have.
    pub level: Level,
}

impl LevelPolicy {
    /// Check the tags (the field is named in the error).
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.minimums.len() > 1000 {
            return Err(ValidationError::new("minimums", "at most 1000"));
        }
        for (i, m) in self.minimums.iter().enumerate() {
            crate::constraint::parse_tag(&m.tag)
                .map_err(|e| ValidationError::new(format!("minimums[{i}].tag"), e.message))?;
        }
        Ok(())
    }

    /// The highest minimum that applies on a node with `tags`, and the tag that sets it.
    pub fn minimum_for(&self, tags: &BTreeMap<String, String>) -> Option<(Level, &str)> {
        self.minimums
            .iter()
            .filter(|m| {
                crate::constraint::parse_tag(&m.tag).is_ok_and(|(k, v)| tags.get(&k) == Some(&v))
            })
            .max_by_key(|m| m.level.rank())
            .map(|m| (m.level, m.tag.as_str()))
    }
}

/// Resources a workload asks for, and a node's capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in thousandths of a core.
    #[serde(default = "default_cpu_millis")]
    pub cpu_millis: u32,
    /// Memory in MiB (for wasm: the cap on linear memory).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
}

fn default_cpu_millis() -> u32 {
    100
}
fn default_memory_mib() -> u32 {
    64
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millis: default_cpu_millis(),
            memory_mib: default_memory_mib(),
        }
    }
}

impl Resources {
    /// Component-wise sum.
    pub fn saturating_add(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
        }
    }
    /// Component-wise difference, floored at zero.
    pub fn saturating_sub(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
        }
    }
    /// Whether `need` fits in `self`.
    pub fn fits(self, need: Resources) -> bool {
        need.cpu_millis <= self.cpu_millis && need.memory_mib <= self.memory_mib
    }
}

/// A soft placement preference: nodes matching `rule` get `weight` added to their score.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    /// A constraint expression, e.g. `zone == tokyo`.
    pub rule: String,
    /// -100..=100; negative is anti-affinity.
    pub weight: i32,
}

/// Placement rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Hard constraints on node tags, all must hold.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// Spread replicas (FT pair, HA reservation) across this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// Soft preferences.
    #[serde(default)]
    pub affinity: Vec<Affinity>,
    /// `spread` (default: the least allocated node) or `pack` (the most allocated that
    /// fits, keeping whole nodes free).
    #[serde(default)]
    pub policy: PlacementPolicy,
}

/// How the scheduler chooses among the nodes that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PlacementPolicy {
    /// The least allocated node.
    #[default]
    Spread,
    /// The most allocated node that fits.
    Pack,
}

/// Options of level `ha`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HaSpec {
    /// Restart order when capacity is short: higher first.
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// wasm: how often the running copy sends a checkpoint to the standby on its
    /// reserved node, ms; a restart there resumes from the last one (the recovery point
    /// is at most this old). 100..=60000.
    #[serde(default = "default_checkpoint_ms")]
    pub checkpoint_ms: u32,
}
fn default_priority() -> i32 {
    100
}
fn default_checkpoint_ms() -> u32 {
    1000
}
impl Default for HaSpec {
    fn default() -> Self {
        HaSpec {
            priority: default_priority(),
            checkpoint_ms: default_checkpoint_ms(),
        }
    }
}

/// What a `qemu` workload boots and exposes. Its kernel is the spec's `artifact`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The initial RAM disk's content digest `sha256:<hex>` (uploaded like the kernel;
    /// the CLI uploads a file named here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Virtual CPUs, 1..=16.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// The guest TCP port HTTP requests are routed to.
    #[serde(default = "default_guest_port")]
    pub port: u16,
}
fn default_cmdline() -> String {
    "console=ttyS0 quiet panic=-1".into()
}
fn default_vcpus() -> u32 {
    1
}
fn default_guest_port() -> u16 {
    80
}
impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: default_vcpus(),
            port: default_guest_port(),
        }
    }
}

/// The least memory of a `qemu` workload, MiB (a Linux kernel and its initrd).
pub const MIN_VM_MEMORY_MIB: u32 = 64;
/// The most virtual CPUs of a `qemu` workload.
pub const MAX_VM_VCPUS: u32 = 16;
/// The longest kernel command line, bytes.
pub const MAX_CMDLINE_BYTES: usize = 2048;

/// What an FT primary does when its secondary is lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SecondaryLoss {
    /// Hold outputs until a new secondary is synced or the lease is taken.
    #[default]
    Hold,
    /// Release outputs unprotected (degraded).
    Release,
}

/// Options of level `ft`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FtSpec {
    /// Checkpoint epoch in milliseconds.
    #[serde(default = "default_epoch_ms")]
    pub epoch_ms: u32,
    /// Policy on secondary loss.
    #[serde(default)]
    pub on_secondary_loss: SecondaryLoss,
}
fn default_epoch_ms() -> u32 {
    10
}
impl Default for FtSpec {
    fn default() -> Self {
        FtSpec {
            epoch_ms: default_epoch_ms(),
            on_secondary_loss: SecondaryLoss::default(),
        }
    }
}

/// A workload as the user declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// DNS label, unique in the cluster.
    pub name: String,
    /// The driver.
    pub driver: DriverKind,
    /// wasm: the module's content digest `sha256:<hex>` (the CLI uploads the file and
    /// fills this in); process: the program to run; qemu: the kernel's digest.
    pub artifact: String,
    /// process: arguments; `$PORT` in an argument is replaced by the port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// process: environment variables (besides `PORT`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Availability level.
    #[serde(default)]
    pub level: Level,
    /// Requested resources.
    #[serde(default)]
    pub resources: Resources,
    /// Placement rules.
    #[serde(default)]
    pub placement: Placement,
    /// Options of level `ha`.
    #[serde(default)]
    pub ha: HaSpec,
    /// Options of level `ft`.
    #[serde(default)]
    pub ft: FtSpec,
    /// Handler deadline in milliseconds (wasm): a longer call is interrupted, 504.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// qemu: what the VM boots and exposes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmSpec>,
}
fn default_timeout_ms() -> u32 {
    5000
}

/// Largest memory a workload may ask for, MiB (wasm32 addresses 4 GiB).
pub const MAX_MEMORY_MIB: u32 = 4096;
/// Largest memory of an `ft` workload: a full image (memory, globals and a reply log of
/// at most 32 MiB plus one reply of up to 64 MiB) must fit one checkpoint frame (1 GiB).
pub const MAX_FT_MEMORY_MIB: u32 = 900;

/// The least CPU a workload may ask for, thousandths of a core. Admission counts what a
/// workload asks for, so a floor keeps a node from being promised more instances than it
/// can run (1,100 workloads of 1 millicore each once loaded 2 cores to 1,100).
pub const MIN_CPU_MILLIS: u32 = 10;

/// Whether `s` is a DNS label: 1-63 of `[a-z0-9-]`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a content digest `sha256:` + 64 lower-case hex digits.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl WorkloadSpec {
    /// Whether spec text (TOML or JSON, as [`WorkloadSpec::parse`] takes) names a
    /// level; one that does not gets the cluster's default.
    pub fn names_level(text: &str) -> bool {
        if text.trim_start().starts_with('{') {
            serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.get("level").is_some())
        } else {
            toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("level"))
        }
    }

    /// Parse a spec from TOML or JSON text (JSON when it starts with `{`); unknown
    /// fields are refused.
    pub fn parse(text: &str) -> Result<WorkloadSpec, ValidationError> {
        if text.trim_start().starts_with('{') {
            // The path of the offending field, e.g. `resources.cpu_millis`.
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let named = field_in_message(&inner.to_string());
                // The path ends at an unknown field; a missing one names itself.
                let missing = inner.to_string().contains("missing field `");
                let field = match (path.as_str(), named) {
                    // At the top, or nowhere (a syntax error).
                    ("." | "?", Some(f)) => f,
                    ("." | "?", None) => json_field(&inner),
                    (p, Some(f)) if missing => format!("{p}.{f}"),
                    (p, _) => p.to_string(),
                };
                ValidationError::new(field, inner.to_string())
            })
        } else {
            toml::from_str(text).map_err(|e| {
                let msg = e.message().to_string();
                ValidationError::new(field_in_message(&msg).unwrap_or_else(|| "spec".into()), msg)
            })
        }
    }

    /// The checks of a `qemu` workload: digests of its kernel and initrd, its vCPUs,
    /// command line and memory; no `ft` (see `docs/vms.md`).
    fn validate_vm(&self) -> Result<(), ValidationError> {
        if !is_digest(&self.artifact) {
            return Err(ValidationError::new(
                "artifact",
                format!(
                    "{:?} is not an uploaded kernel digest (sha256:<64 hex>); the CLI uploads the file for you",
                    self.artifact
                ),
            ));
        }
        if !self.args.is_empty() || !self.env.is_empty() {
            return Err(ValidationError::new(
                "args",
                "args and env are for the process driver",
            ));
        }
        if self.level == Level::Ft {
            return Err(ValidationError::new(
                "level",
                "the qemu driver supports levels ha and none: ft needs checkpoints of the whole VM, which qemu's COLO does not hold up here (docs/vms.md)",
            ));
        }
        if self.resources.memory_mib < MIN_VM_MEMORY_MIB {
            return Err(ValidationError::new(
                "resources.memory_mib",
                format!(
                    "a VM needs at least {MIN_VM_MEMORY_MIB} MiB, got {}",
                    self.resources.memory_mib
                ),
            ));
        }
        let vm = self.vm.clone().unwrap_or_default();
        if let Some(i) = &vm.initrd
            && !is_digest(i)
        {
            return Err(ValidationError::new(
                "vm.initrd",
                format!("{i:?} is not an uploaded initrd digest (sha256:<64 hex>)"),
            ));
        }
        if vm.vcpus == 0 || vm.vcpus > MAX_VM_VCPUS {
            return Err(ValidationError::new(
                "vm.vcpus",
                format!("must be 1..={MAX_VM_VCPUS}, got {}", vm.vcpus),
            ));
        }
        if vm.cmdline.len() > MAX_CMDLINE_BYTES || vm.cmdline.chars().any(|c| c.is_control()) {
            return Err(ValidationError::new(
                "vm.cmdline",
                format!("at most {MAX_CMDLINE_BYTES} bytes, one line"),
            ));
        }
        if vm.port == 0 {
            return Err(ValidationError::new("vm.port", "must be 1..=65535"));
        }
        Ok(())
    }

    /// Check everything that can be checked without I/O. The artifact's content is
    /// checked by the driver.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !is_dns_label(&self.name) {
            return Err(ValidationError::new(
                "name",
                format!(
                    "{:?} is not a DNS label (1-63 characters of a-z, 0-9 and '-', not starting or ending with '-')",
                    self.name
                ),
            ));
        }
        match self.driver {
            DriverKind::Wasm => {
                if !is_digest(&self.artifact) {
                    return Err(ValidationError::new(
                        "artifact",
                        format!(
                            "{:?} is not an uploaded module digest (sha256:<64 hex>); the CLI uploads the file for you",
                            self.artifact
                        ),
                    ));
                }
                if !self.args.is_empty() || !self.env.is_empty() {
                    return Err(ValidationError::new(
                        "args",
                        "args and env are for the process driver",
                    ));
                }
            }
            DriverKind::Process => {
                if self.artifact.trim().is_empty() {
                    return Err(ValidationError::new(
                        "artifact",
                        "the program to run is missing",
                    ));
                }
                if self.level == Level::Ft {
                    return Err(ValidationError::new(
                        "level",
                        "the process driver supports levels ha and none; ft needs the wasm driver",
                    ));
                }
                if let Some(k) = self
                    .env
                    .keys()
                    .find(|k| k.is_empty() || k.contains('=') || *k == "PORT" || *k == "HOST")
                {
                    return Err(ValidationError::new(
                        format!("env.{k}"),
                        "bad or reserved variable name",
                    ));
                }
            }
            DriverKind::Qemu => self.validate_vm()?,
        }
        if self.driver != DriverKind::Qemu && self.vm.is_some() {
            return Err(ValidationError::new("vm", "vm is for the qemu driver"));
        }
        if self.resources.memory_mib == 0 || self.resources.memory_mib > MAX_MEMORY_MIB {
            return Err(ValidationError::new(
                "resources.memory_mib",
                format!(
                    "must be 1..={MAX_MEMORY_MIB}, got {}",
                    self.resources.memory_mib
                ),
            ));
        }
        if self.level == Level::Ft && self.resources.memory_mib > MAX_FT_MEMORY_MIB {
            return Err(ValidationError::new(
                "resources.memory_mib",
                format!(
                    "level ft replicates the whole memory in checkpoint frames of at most 1 GiB: \
                     must be 1..={MAX_FT_MEMORY_MIB}, got {}",
                    self.resources.memory_mib
                ),
            ));
        }
        if self.resources.cpu_millis < MIN_CPU_MILLIS {
            return Err(ValidationError::new(
                "resources.cpu_millis",
                format!(
                    "must be at least {MIN_CPU_MILLIS} (a hundredth of a core), got {}",
                    self.resources.cpu_millis
                ),
            ));
        }
        for (i, c) in self.placement.constraints.iter().enumerate() {
            Constraint::parse(c)
                .map_err(|m| ValidationError::new(format!("placement.constraints[{i}]"), m))?;
        }
        for (i, a) in self.placement.affinity.iter().enumerate() {
            Constraint::parse(&a.rule)
                .map_err(|m| ValidationError::new(format!("placement.affinity[{i}].rule"), m))?;
            if !(-100..=100).contains(&a.weight) {
                return Err(ValidationError::new(
                    format!("placement.affinity[{i}].weight"),
                    "must be -100..=100",
                ));
            }
        }
        if self.ft.epoch_ms == 0 || self.ft.epoch_ms > 10_000 {
            return Err(ValidationError::new("ft.epoch_ms", "must be 1..=10000"));
        }
        if !(100..=60_000).contains(&self.ha.checkpoint_ms) {
            return Err(ValidationError::new(
                "ha.checkpoint_ms",
                "must be 100..=60000",
            ));
        }
        if self.timeout_ms < 10 || self.timeout_ms > 600_000 {
            return Err(ValidationError::new("timeout_ms", "must be 10..=600000"));
        }
        Ok(())
    }

    /// Parsed hard constraints (call after [`validate`](Self::validate)).
    pub fn constraints(&self) -> Vec<Constraint> {
        self.placement
            .constraints
            .iter()
            .filter_map(|c| Constraint::parse(c).ok())
            .collect()
    }
}

/// Best guess at the field a serde_json error is about (`unknown field `x``, `missing field `y``).
fn json_field(e: &serde_json::Error) -> String {
    field_in_message(&e.to_string()).unwrap_or_else(|| "spec".into())
}

fn field_in_message(msg: &str) -> Option<String> {
    for pat in ["unknown field `", "missing field `"] {
        if let Some(rest) = msg.split(pat).nth(1) {
            return rest.split('`').next().map(str::to_string);
        }
    }
    if let Some(rest) = msg.split("unknown variant `").nth(1) {
        // serde does not say which field; the caller's context (driver/level) is in the
        // message: report the variant's likely field by its expected values.
        if msg.contains("`wasm`") {
            return Some("driver".into());
        }
        if msg.contains("`ft`") {
            return Some("level".into());
        }
        return rest.split('`').next().map(|_| "spec".to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    type Mutate = Box<dyn Fn(&mut WorkloadSpec)>;

    fn good() -> WorkloadSpec {
        WorkloadSpec::parse(&format!(
            "name = \"ledger\"\ndriver = \"wasm\"\nartifact = \"{DIGEST}\"\n"
        ))
        .unwrap()
    }

    /// A VM: kernel and initrd by digest, its memory at least a kernel's; each bad
    /// field named, and `ft` refused with the reason.
    #[test]
    fn vm_specs_are_checked_field_by_field() {
        let vm = |extra: &str| {
            WorkloadSpec::parse(&format!(
                "name = \"vm\"\ndriver = \"qemu\"\nartifact = \"{DIGEST}\"\n{extra}\n\
                 [resources]\nmemory_mib = 128\n[vm]\ninitrd = \"{DIGEST}\"\nvcpus = 2\n"
            ))
            .unwrap()
        };
        let ok = vm("");
        ok.validate().unwrap();
        assert_eq!(ok.vm.as_ref().unwrap().port, 80, "the default guest port");
        let cases: Vec<(&str, Mutate)> = vec![
            ("artifact", Box::new(|s| s.artifact = "vmlinuz".into())),
            (
                "vm.initrd",
                Box::new(|s| s.vm.as_mut().unwrap().initrd = Some("initrd.img".into())),
            ),
            ("vm.vcpus", Box::new(|s| s.vm.as_mut().unwrap().vcpus = 0)),
            (
                "vm.vcpus",
                Box::new(|s| s.vm.as_mut().unwrap().vcpus = MAX_VM_VCPUS + 1),
            ),
            ("vm.port", Box::new(|s| s.vm.as_mut().unwrap().port = 0)),
            (
                "vm.cmdline",
                Box::new(|s| s.vm.as_mut().unwrap().cmdline = "a\nb".into()),
            ),
            (
                "resources.memory_mib",
                Box::new(|s| s.resources.memory_mib = MIN_VM_MEMORY_MIB - 1),
            ),
            ("args", Box::new(|s| s.args = vec!["-x".into()])),
        ];
        for (field, f) in cases {
            let mut s = ok.clone();
            f(&mut s);
            assert_eq!(s.validate().unwrap_err().field, field);
        }
        let e = vm("level = \"ft\"").validate().unwrap_err();
        assert_eq!(e.field, "level");
        assert!(e.to_string().contains("COLO"), "{e}");
        assert!(
            WorkloadSpec::parse(
                "name = \"vm\"\ndriver = \"qemu\"\nartifact = \"x\"\n[vm]\ndisk = \"y\"\n"
            )
            .is_err(),
            "unknown vm fields are refused"
        );
    }

    #[test]
    fn toml_and_json_agree() {
        let t = good();
        let j = WorkloadSpec::parse(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(t, j);
        t.validate().unwrap();
        assert_eq!(t.level, Level::None);
        assert_eq!(t.resources.memory_mib, 64);
    }

    #[test]
    fn bad_specs_name_their_field() {
        let cases: Vec<(&str, Mutate)> = vec![
            ("name", Box::new(|s| s.name = "Bad_Name".into())),
            ("name", Box::new(|s| s.name = "-x".into())),
            (
                "resources.memory_mib",
                Box::new(|s| s.resources.memory_mib = 0),
            ),
            (
                "resources.cpu_millis",
                Box::new(|s| s.resources.cpu_millis = 0),
            ),
            (
                "resources.cpu_millis",
                Box::new(|s| s.resources.cpu_millis = MIN_CPU_MILLIS - 1),
            ),
            (
                "artifact",
                Box::new(|s| s.artifact = "guests/counter.wasm".into()),
            ),
            (
                "placement.constraints[0]",
                Box::new(|s| s.placement.constraints = vec!["zone ~ x".into()]),
            ),
            ("vm", Box::new(|s| s.vm = Some(VmSpec::default()))),
            ("timeout_ms", Box::new(|s| s.timeout_ms = 0)),
        ];
        for (field, f) in cases {
            let mut s = good();
            f(&mut s);
            assert_eq!(s.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn parse_errors_name_their_field() {
        let e = WorkloadSpec::parse(&format!(
            "name = \"a\"\ndriver = \"wasm\"\nartifact = \"{DIGEST}\"\ncolour = 1\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "colour");
        let e = WorkloadSpec::parse("name = \"a\"\ndriver = \"docker\"\nartifact = \"x\"\n")
            .unwrap_err();
        assert_eq!(e.field, "driver", "{e}");
        let e = WorkloadSpec::parse(
            "name = \"a\"\ndriver = \"wasm\"\nartifact = \"x\"\nlevel = \"gold\"\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "level", "{e}");
        let e = WorkloadSpec::parse(r#"{"name": "a", "driver": "wasm"}"#).unwrap_err();
        assert_eq!(e.field, "artifact", "{e}");
        let e = WorkloadSpec::parse(r#"{"name": "a", "driver": "wasm", "artifact": "x", "resources": {"memory_mib": 1, "gpus": 1}}"#).unwrap_err();
        assert_eq!(e.field, "resources.gpus", "{e}");
        let e = WorkloadSpec::parse(
            r#"{"name": "a", "driver": "wasm", "artifact": "x", "resources": {"cpu_millis": -5}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "resources.cpu_millis", "{e}");
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("a"));
        assert!(is_dns_label("web-1"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(!is_dns_label("A"));
    }
}

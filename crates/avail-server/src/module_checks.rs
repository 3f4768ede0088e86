//! Checks of uploaded wasm modules, remembered per artifact digest.
//!
//! Creating a wasm workload checks its module (it loads, exports the guest ABI) and
//! whether the checkpoint rewrite takes it (levels `ha`/`ft`, live level changes). Both
//! depend only on the module's bytes, and an artifact is named by the digest of its
//! bytes, so the answer is kept per digest: creating 2,000 workloads of one module
//! checks it once. At most [`MAX_ENTRIES`] answers are kept (the whole map is dropped
//! when it is full: a later create checks again).

use std::collections::HashMap;
use std::sync::Mutex;

/// Digests whose answers are kept, at most.
pub const MAX_ENTRIES: usize = 1024;

/// What a module check said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// `Err`: the module is not a valid guest (why).
    pub valid: Result<(), String>,
    /// `Err`: the checkpoint rewrite refuses it (why); it runs only as a plain instance.
    pub rewrite: Result<(), String>,
}

/// Answers by digest.
#[derive(Default)]
pub struct ModuleChecks {
    answers: Mutex<HashMap<String, Checked>>,
}

impl ModuleChecks {
    /// The answer for `digest`, if it was checked.
    pub fn get(&self, digest: &str) -> Option<Checked> {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    /// Keep the answer for `digest`.
    pub fn put(&self, digest: &str, checked: Checked) {
        let mut a = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if a.len() >= MAX_ENTRIES {
            a.clear();
        }
        a.insert(digest.to_string(), checked);
    }

    /// Check `module` (on the caller's thread: a blocking one).
    pub fn check(module: &[u8]) -> Checked {
        let valid = avail_driver::wasm::check(module);
        let rewrite = match &valid {
            Ok(()) => avail_statepoint::rewrite::rewrite(module)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        Checked { valid, rewrite }
    }
}

/// Why a module could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No artifact of this digest was uploaded.
    #[error("{0} has not been uploaded (PUT /v1/artifacts)")]
    NotUploaded(String),
    /// The check's task failed.
    #[error("module check: {0}")]
    Task(String),
}

impl crate::state::AppState {
    /// Whether the artifact `digest` was uploaded.
    pub async fn artifact_uploaded(&self, digest: &str) -> bool {
        let path = self
            .artifacts_dir()
            .join(crate::api::artifacts::artifact_file(digest));
        tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file())
    }

    /// For a `qemu` workload (its spec validated): its kernel and initrd must be
    /// uploaded, for its nodes to fetch. Else the field and why.
    pub async fn vm_files_uploaded(
        &self,
        spec: &avail_model::WorkloadSpec,
    ) -> Result<(), (&'static str, String)> {
        if spec.driver != avail_model::DriverKind::Qemu {
            return Ok(());
        }
        let vm = spec.vm.clone().unwrap_or_default();
        let named = [
            ("artifact", Some(&spec.artifact)),
            ("vm.initrd", vm.initrd.as_ref()),
        ];
        for (field, digest) in named {
            if let Some(d) = digest
                && !self.artifact_uploaded(d).await
            {
                return Err((
                    field,
                    format!("{d} has not been uploaded (PUT /v1/artifacts)"),
                ));
            }
        }
        Ok(())
    }

    /// The check of the uploaded module `digest`: remembered, or made now (on a
    /// blocking thread) and remembered.
    pub async fn module_check(&self, digest: &str) -> Result<Checked, CheckError> {
        if let Some(c) = self.module_checks.get(digest) {
            return Ok(c);
        }
        let path = self
            .artifacts_dir()
            .join(crate::api::artifacts::artifact_file(digest));
        let module = tokio::fs::read(&path)
            .await
            .map_err(|_| CheckError::NotUploaded(digest.to_string()))?;
        let c = tokio::task::spawn_blocking(move || ModuleChecks::check(&module))
            .await
            .map_err(|e| CheckError::Task(e.to_string()))?;
        self.module_checks.put(digest, c.clone());
        Ok(c)
    }
}

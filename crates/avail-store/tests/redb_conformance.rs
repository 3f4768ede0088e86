//! The conformance suite against [`RedbStore`], one test per check, each on a fresh file.

use avail_store::RedbStore;
use avail_store::conformance;

async fn make() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(&dir.path().join("store.redb")).expect("open");
    (dir, store)
}

avail_store::store_conformance_tests!(make);

/// `run_all` itself (the entry point other backends may use) on a single-threaded
/// runtime: every blocking redb call must stay off the runtime's only thread.
#[tokio::test(flavor = "current_thread")]
async fn run_all_on_current_thread_runtime() {
    conformance::run_all(make).await;
}

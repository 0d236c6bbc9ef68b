//! The key-service conformance suite against the in-process
//! `LocalKeyService`, the reference every other backend is held to (and,
//! on a fresh service of its own, the suite's custodian cycle: the former
//! `tests/conformance.rs`).

use crate::keyservice_conformance;

use std::sync::Arc;

use async_trait::async_trait;
use keyservice_conformance::Backend;
use panseal::{Environment, KeyService, LocalKeyService, Permissions};

struct Local(LocalKeyService);

#[async_trait]
impl Backend for Local {
    fn name(&self) -> &str {
        "local"
    }

    async fn destroy_kek(&self, version: u32) {
        self.0.destroy_kek(version).unwrap();
    }

    fn has_outage(&self) -> bool {
        false
    }

    async fn begin_outage(&self) {
        unreachable!("the in-process service has no outage")
    }

    async fn end_outage(&self) {
        unreachable!("the in-process service has no outage")
    }

    async fn restricted(&self, permissions: Permissions) -> Option<Arc<dyn KeyService>> {
        Some(Arc::new(self.0.restricted(permissions)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_key_service_passes_the_conformance_suite() {
    let ks = LocalKeyService::new(Environment::new("test").unwrap());
    let backend = Local(ks.clone());
    let ks: Arc<dyn KeyService> = Arc::new(ks);
    keyservice_conformance::run(Arc::clone(&ks), &backend, "test").await;
    keyservice_conformance::run_index_and_records(Arc::clone(&ks), &backend, "test").await;
    keyservice_conformance::run_ingest(ks, &backend, "test").await;
}

#[tokio::test]
async fn local_key_service_conforms() {
    let ks = LocalKeyService::new(Environment::new("test").unwrap());
    let backend = Local(ks.clone());
    keyservice_conformance::custodian_cycle(
        &ks,
        &backend,
        "test",
        "prod",
        "merchant-1",
        "merchant-2",
    )
    .await;
}

//! `panseal-keyd` (through `RemoteKeyService`) against the same key-service
//! conformance suite as the local, PKCS#11 and AWS KMS backends
//! (tests/it/keyservice_conformance.rs): a real server process on 127.0.0.1;
//! KEK destruction is two custodians' approvals, and the outage is the
//! server killed and restarted (sealed, then unsealed by two custodians).

use crate::keyd_harness;
use crate::keyservice_conformance;

use std::sync::Arc;

use async_trait::async_trait;
use keyd_harness::Keyd;
use keyservice_conformance::Backend;
use panseal::{KeyService, Permissions, Scope};
use tokio::sync::Mutex;

struct KeydBackend {
    keyd: Mutex<Keyd>,
    scope: Scope,
}

#[async_trait]
impl Backend for KeydBackend {
    fn name(&self) -> &str {
        "keyd"
    }

    async fn destroy_kek(&self, version: u32) {
        let k = self.keyd.lock().await;
        let alice = k.client("alice");
        // keyd destroys only retired versions, with two custodians.
        let _ = alice.retire(&self.scope, version).await;
        let first = alice.approve_destroy(&self.scope, version).await.unwrap();
        assert!(!first.destroyed, "one approval must not destroy");
        let done = k
            .client("bob")
            .approve_destroy(&self.scope, version)
            .await
            .unwrap();
        assert!(done.destroyed);
    }

    fn has_outage(&self) -> bool {
        true
    }

    async fn begin_outage(&self) {
        self.keyd.lock().await.kill();
    }

    async fn end_outage(&self) {
        let mut k = self.keyd.lock().await;
        k.start();
        k.unseal().await;
    }

    /// The harness's principals with exactly these permissions.
    async fn restricted(&self, permissions: Permissions) -> Option<Arc<dyn KeyService>> {
        let only = |f: fn(&mut Permissions)| {
            let mut p = Permissions {
                wrap: false,
                unwrap: false,
                index: false,
                reveal: false,
                rewrap: false,
                admit: false,
                custodian: false,
            };
            f(&mut p);
            p
        };
        let name = if permissions == only(|p| p.wrap = true) {
            "wrapper"
        } else if permissions == only(|p| p.index = true) {
            "indexer"
        } else if permissions
            == only(|p| {
                p.wrap = true;
                p.index = true
            })
        {
            "checkout"
        } else if permissions
            == only(|p| {
                p.wrap = true;
                p.admit = true
            })
        {
            "admitter"
        } else {
            return None;
        };
        let k = self.keyd.lock().await;
        Some(Arc::new(k.client_with(name, |b| b.scope("merchant-1"))))
    }

    fn remembers_record_sequence(&self) -> bool {
        true
    }

    /// A KEK per scope, rotated by a custodian.
    async fn rotate_kek(&self, _ks: &dyn KeyService, scope: &Scope) -> u32 {
        let k = self.keyd.lock().await;
        k.client("alice")
            .rotate(scope)
            .await
            .unwrap()
            .active_version
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyd_passes_the_key_service_conformance_suite() {
    let k = Keyd::ready().await;
    // keyd creates a scope's KEK on first use; a custodian creates it now
    // so that `kek_info` reports version 1 like every other backend.
    let scope = Scope::new("merchant-1").unwrap();
    assert_eq!(
        k.client("alice")
            .rotate(&scope)
            .await
            .unwrap()
            .active_version,
        1
    );
    let ks = k.client_with("root", |b| b.scope("merchant-1"));
    let backend = KeydBackend {
        keyd: Mutex::new(k),
        scope: Scope::new("merchant-1").unwrap(),
    };
    let ks: Arc<dyn KeyService> = Arc::new(ks);
    keyservice_conformance::run(Arc::clone(&ks), &backend, "test").await;
    keyservice_conformance::run_index_and_records(Arc::clone(&ks), &backend, "test").await;
    keyservice_conformance::run_ingest(ks, &backend, "test").await;
    backend.keyd.lock().await.kill();
}

//! The key-service conformance suite against `AwsKmsKeyService` on a moto
//! server the test starts (its own process; the outage step freezes it).
//!
//! Out-of-band steps, as they happen to KMS:
//! * destroying a KEK version is `ScheduleKeyDeletion` of its key, through
//!   a separate SDK client (as a custodian would in the console or CLI);
//! * the outage is an endpoint that stops answering: the moto process is
//!   frozen with `SIGSTOP` (connections hang, as behind a dead link) and
//!   resumed with `SIGCONT`, its state intact.

use crate::keyservice_conformance;
use crate::moto;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyservice_conformance::Backend;
use panseal::{
    AwsKmsConfig, AwsKmsCredentials, AwsKmsKeyService, Environment, KeyService, Permissions,
};

const KEK: &str = "cards";

struct MotoBackend {
    moto: moto::Moto,
}

fn config(endpoint: &str) -> AwsKmsConfig {
    AwsKmsConfig::new(KEK, Environment::new("test").unwrap())
        .region(moto::REGION)
        .endpoint_url(endpoint)
        .credentials(AwsKmsCredentials::new(
            moto::ACCESS_KEY_ID,
            moto::SECRET_ACCESS_KEY.into(),
            None,
        ))
        .timeouts(Duration::from_secs(1), Duration::from_secs(2))
        .max_attempts(2)
        // Read each version's state before every use, so a key scheduled
        // for deletion a moment ago is refused (moto itself does not
        // enforce key states; AWS KMS does).
        .key_cache_ttl(Duration::ZERO)
        .create_kek_if_missing(true)
}

#[async_trait]
impl Backend for MotoBackend {
    fn name(&self) -> &str {
        "aws-kms-moto"
    }

    async fn destroy_kek(&self, version: u32) {
        let client = moto::raw_client(&self.moto.endpoint());
        let key = moto::alias_target(&client, &format!("alias/panseal/{KEK}/v{version}")).await;
        client
            .schedule_key_deletion()
            .key_id(key)
            .pending_window_in_days(7)
            .send()
            .await
            .unwrap();
    }

    fn has_outage(&self) -> bool {
        true
    }

    async fn restricted(&self, permissions: Permissions) -> Option<Arc<dyn KeyService>> {
        let ks = AwsKmsKeyService::connect(config(&self.moto.endpoint()).permissions(permissions))
            .await
            .unwrap();
        Some(Arc::new(ks))
    }

    async fn begin_outage(&self) {
        self.moto.stall();
    }

    async fn end_outage(&self) {
        self.moto.resume();
    }

    /// Documented in `AwsKmsKeyService`: ingest keys need KMS
    /// `DeriveSharedSecret`, which moto does not implement.
    fn ingest_unsupported(&self) -> Option<&'static str> {
        Some("DeriveSharedSecret")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_key_service_passes_the_conformance_suite() {
    let moto = moto::Moto::start();
    let config = config(&moto.endpoint());
    let ks = AwsKmsKeyService::connect(config).await.unwrap();
    let backend = MotoBackend { moto };
    keyservice_conformance::run(Arc::new(ks.clone()), &backend, "test").await;
    keyservice_conformance::run_index_and_records(Arc::new(ks.clone()), &backend, "test").await;
    keyservice_conformance::run_ingest(Arc::new(ks), &backend, "test").await;
}

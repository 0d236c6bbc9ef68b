//! The KeyService conformance suite against the in-process service.

use crate::keyd_conformance;

use async_trait::async_trait;
use keyd_conformance::{run, KekAdmin, Target};
use panseal::{Environment, KeyService, LocalKeyService, Scope};

struct LocalAdmin(LocalKeyService);

#[async_trait]
impl KekAdmin for LocalAdmin {
    async fn rotate(&self, _scope: &Scope) -> u32 {
        self.0.rotate_kek().await.unwrap().version
    }
    async fn destroy(&self, _scope: &Scope, version: u32) {
        self.0.destroy_kek(version).unwrap();
    }
}

#[tokio::test]
async fn local_key_service_conforms() {
    let ks = LocalKeyService::new(Environment::new("test").unwrap());
    let admin = LocalAdmin(ks.clone());
    run(&Target {
        ks: &ks,
        admin: &admin,
        environment: Environment::new("test").unwrap(),
        other_environment: Environment::new("prod").unwrap(),
        scope: Scope::new("merchant-1").unwrap(),
        other_scope: Scope::new("merchant-2").unwrap(),
    })
    .await;
}

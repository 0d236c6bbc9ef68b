//! The key-service conformance suite against `Pkcs11KeyService` on a
//! SoftHSM2 token set up by the test (alone among the PKCS#11 tests of the
//! binary, `softhsm::SERIAL`, because the outage step stalls the module).
//!
//! Out-of-band steps, as they happen to a real HSM:
//! * destroying a KEK version is `C_DestroyObject` on its token object,
//!   through a separate PKCS#11 handle (as a custodian's tool would);
//! * the outage is a token that stops answering: a helper process takes
//!   the POSIX locks on every file of the token's directory, so SoftHSM2's
//!   calls block, as calls to an unreachable network HSM hang. The service
//!   must turn that into a retryable `Unavailable` within its operation
//!   timeout and carry on when the token answers again.

use crate::keyservice_conformance;
use crate::softhsm;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use keyservice_conformance::Backend;
use panseal::{Environment, KeyService, Permissions, Pkcs11Config, Pkcs11KeyService, Pkcs11Pin};

const TOKEN: &str = "conformance";
const KEK: &str = "cards";

struct SoftHsmBackend {
    hsm: &'static softhsm::SoftHsm,
    locker: Mutex<Option<Child>>,
}

fn config(hsm: &softhsm::SoftHsm) -> Pkcs11Config {
    Pkcs11Config::new(&hsm.module, TOKEN, KEK, Environment::new("test").unwrap())
        .create_kek_if_missing(true)
        .max_sessions(4)
        .operation_timeout(Duration::from_secs(2))
}

#[async_trait]
impl Backend for SoftHsmBackend {
    fn name(&self) -> &str {
        "pkcs11-softhsm2"
    }

    async fn destroy_kek(&self, version: u32) {
        let ctx = Pkcs11::new(&self.hsm.module).unwrap();
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::CryptokiAlreadyInitialized,
                _,
            )) => {}
            Err(e) => panic!("{e}"),
        }
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label() == TOKEN)
            .unwrap();
        let session = ctx.open_rw_session(slot).unwrap();
        let _ = session.login(UserType::User, Some(&AuthPin::from(softhsm::PIN)));
        let label = format!("panseal-kek:{KEK}:v{version}");
        let found = session
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .unwrap();
        assert_eq!(found.len(), 1, "{label}");
        session.destroy_object(found[0]).unwrap();
    }

    fn has_outage(&self) -> bool {
        true
    }

    async fn restricted(&self, permissions: Permissions) -> Option<Arc<dyn KeyService>> {
        let ks = Pkcs11KeyService::connect(
            config(self.hsm).permissions(permissions),
            Pkcs11Pin::new(softhsm::PIN.into()),
        )
        .await
        .unwrap();
        Some(Arc::new(ks))
    }

    async fn begin_outage(&self) {
        let dir = &self.hsm.token_dirs[TOKEN];
        let script = format!(
            "import fcntl, glob, sys, time\n\
             files = [open(p, 'r+') for p in glob.glob({:?} + '/*')]\n\
             for f in files: fcntl.lockf(f, fcntl.LOCK_EX)\n\
             print('locked', len(files), flush=True)\n\
             time.sleep(600)\n",
            dir.display().to_string()
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is needed to stall the token (scripts/setup.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("locked"), "lock helper: {line:?}");
        *self.locker.lock().unwrap() = Some(child);
    }

    async fn end_outage(&self) {
        let child = self.locker.lock().unwrap().take();
        if let Some(mut child) = child {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for SoftHsmBackend {
    fn drop(&mut self) {
        if let Some(mut child) = self.locker.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_key_service_passes_the_conformance_suite() {
    // Alone among the PKCS#11 tests of the binary: its outage step stalls
    // the token (`softhsm::SERIAL`).
    let _serial = softhsm::SERIAL.lock().await;
    let hsm = softhsm::softhsm(&[TOKEN]);
    let ks = Pkcs11KeyService::connect(config(hsm), Pkcs11Pin::new(softhsm::PIN.into()))
        .await
        .unwrap();
    let backend = SoftHsmBackend {
        hsm,
        locker: Mutex::new(None),
    };
    keyservice_conformance::run(Arc::new(ks.clone()), &backend, "test").await;
    keyservice_conformance::run_index_and_records(Arc::new(ks.clone()), &backend, "test").await;
    keyservice_conformance::run_ingest(Arc::new(ks.clone()), &backend, "test").await;
    let stats = ks.pool_stats();
    assert!(stats.open <= 4, "{stats:?}");
}

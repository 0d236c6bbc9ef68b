//! The committed test vectors in `tests/vectors/` (made by an independent
//! Python implementation of FORMAT.md, `gen_vectors.py`) decode and encode
//! exactly as FORMAT.md says.
use panseal::{
    hazmat, Context, Dek, Environment, Error, FormatError, KekRef, KeyId, KeyPurpose, KeyRequest,
    KeyServiceError, KeyState, LocalKeyService, Pan, PanRules, Scope, SealedPan, WrappedDek,
};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hex32(v: &Value) -> [u8; 32] {
    hex::decode(v.as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

fn bytes(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

fn context(v: &Value) -> Context {
    Context::new(
        v["table"].as_str().unwrap(),
        v["column"].as_str().unwrap(),
        bytes(&v["row_key_hex"]),
    )
    .unwrap()
}

#[test]
fn ciphertext_v1_positive_vectors() {
    let doc = load("ciphertext_v1.json");
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 9);
    let rules = PanRules::with_min_digits(8).unwrap();
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let dek = Dek::from_bytes_insecure(hex32(&v["dek_hex"]));
        let id = KeyId::from_bytes(bytes(&v["dek_id_hex"]).try_into().unwrap());
        let nonce: [u8; 12] = bytes(&v["nonce_hex"]).try_into().unwrap();
        let ctx = context(&v["context"]);
        let pan = Pan::parse_with(v["pan"].as_str().unwrap(), &rules).unwrap();
        let binary = bytes(&v["binary_hex"]);
        // Associated data = header || context encoding.
        let mut aad = binary[..10].to_vec();
        aad.extend_from_slice(ctx.encoded());
        assert_eq!(hex::encode(&aad), v["aad_hex"].as_str().unwrap(), "{name}");
        // Sealing with the vector's nonce gives the vector's bytes and text.
        let sealed = hazmat::seal_with_nonce(&dek, id, nonce, &pan, &ctx);
        assert_eq!(sealed.as_bytes(), binary.as_slice(), "{name}");
        assert_eq!(sealed.to_text(), v["text"].as_str().unwrap(), "{name}");
        assert_eq!(sealed.key_id(), id);
        // Both forms parse to the same ciphertext and open to the PAN.
        let from_text = SealedPan::from_text(v["text"].as_str().unwrap()).unwrap();
        assert_eq!(from_text, SealedPan::from_bytes(&binary).unwrap(), "{name}");
        let opened = hazmat::open_with_dek(&dek, &from_text, &ctx).unwrap();
        assert_eq!(opened.expose_digits(), v["pan"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn ciphertext_v1_negative_vectors() {
    let doc = load("ciphertext_v1.json");
    let negatives = doc["negative"].as_array().unwrap();
    assert!(negatives.len() >= 20);
    let mut seen = std::collections::HashSet::new();
    for v in negatives {
        let name = v["name"].as_str().unwrap();
        let expect = v["expect"].as_str().unwrap();
        seen.insert(expect.to_owned());
        let dek = Dek::from_bytes_insecure(hex32(&v["dek_hex"]));
        let ctx = context(&v["context"]);
        let parsed = if let Some(t) = v.get("text") {
            SealedPan::from_text(t.as_str().unwrap())
        } else {
            SealedPan::from_bytes(&bytes(&v["binary_hex"]))
        };
        let got = match parsed {
            Err(Error::Format(_)) => "format",
            Err(e) => panic!("{name}: unexpected parse error {e:?}"),
            Ok(s) => match hazmat::open_with_dek(&dek, &s, &ctx) {
                Ok(_) => panic!("{name}: opened"),
                Err(Error::Decryption) => "decryption",
                Err(Error::Format(FormatError::Payload)) => "payload",
                Err(e) => panic!("{name}: unexpected open error {e:?}"),
            },
        };
        assert_eq!(got, expect, "{name}");
    }
    assert_eq!(seen.len(), 3, "every error class is covered");
}

fn request(v: &Value) -> KeyRequest {
    KeyRequest {
        id: KeyId::from_bytes(bytes(&v["id_hex"]).try_into().unwrap()),
        scope: Scope::new(v["scope"].as_str().unwrap()).unwrap(),
        environment: Environment::new(v["environment"].as_str().unwrap()).unwrap(),
        purpose: match v["purpose"].as_str().unwrap() {
            "data" => KeyPurpose::Data,
            "index" => KeyPurpose::Index,
            p => panic!("purpose {p}"),
        },
    }
}

fn kek_ref(v: &Value) -> KekRef {
    KekRef {
        id: v["kek_id"].as_str().unwrap().to_owned(),
        version: v["kek_version"].as_u64().unwrap() as u32,
    }
}

#[test]
fn wrap_v1_vectors() {
    let doc = load("wrap_v1.json");
    for v in doc["vectors"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let kek = hex32(&v["kek_hex"]);
        let req = request(&v["request"]);
        let kref = kek_ref(v);
        assert_eq!(
            hex::encode(req.wrap_aad(&kref)),
            v["aad_hex"].as_str().unwrap(),
            "{name}"
        );
        let dek = Dek::from_bytes_insecure(hex32(&v["dek_hex"]));
        let nonce: [u8; 12] = bytes(&v["nonce_hex"]).try_into().unwrap();
        let wrapped = hazmat::wrap_with_nonce(&kek, &kref, &req, &dek, nonce);
        assert_eq!(
            hex::encode(&wrapped),
            v["wrapped_hex"].as_str().unwrap(),
            "{name}"
        );
        let back = hazmat::unwrap_with_kek(&kek, &kref, &req, &wrapped).unwrap();
        assert_eq!(hazmat::dek_bytes(&back), hex32(&v["dek_hex"]), "{name}");
        // The local key service (whose KEK v1 is this key) unwraps it too.
        // (Index keys are never unwrapped to a caller since issue 10.)
        if kref.id == "local" && kref.version == 1 && req.purpose == KeyPurpose::Data {
            let ks = LocalKeyService::from_kek_bytes_insecure(req.environment.clone(), kek);
            let access = panseal::Access::new("vectors", "test").unwrap();
            let w = panseal::WrappedKey {
                kek: kref.clone(),
                bytes: wrapped.clone(),
            };
            let dek = tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(panseal::KeyService::unwrap(&ks, &req, &w, &access))
                .unwrap();
            assert_eq!(hazmat::dek_bytes(&dek), hex32(&v["dek_hex"]));
        }
    }
    for v in doc["negative"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let r = hazmat::unwrap_with_kek(
            &hex32(&v["kek_hex"]),
            &kek_ref(v),
            &request(&v["request"]),
            &bytes(&v["wrapped_hex"]),
        );
        assert!(
            matches!(r, Err(KeyServiceError::UnwrapFailed)),
            "{name}: {r:?}"
        );
    }
}

#[test]
fn record_v1_vectors() {
    let doc = load("record_v1.json");
    let mut by_name = std::collections::HashMap::new();
    for v in doc["records"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let f = &v["fields"];
        let raw = bytes(&v["record_hex"]);
        let r = WrappedDek::from_bytes(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(hex::encode(r.id.as_bytes()), f["id_hex"].as_str().unwrap());
        assert_eq!(
            r.purpose,
            match f["purpose"].as_str().unwrap() {
                "data" => KeyPurpose::Data,
                _ => KeyPurpose::Index,
            }
        );
        assert_eq!(u64::from(r.version), f["version"].as_u64().unwrap());
        let state: KeyState = serde_json::from_value(f["state"].clone()).unwrap();
        assert_eq!(r.state, state, "{name}");
        assert_eq!(r.scope.as_str(), f["scope"].as_str().unwrap());
        assert_eq!(r.environment.as_str(), f["environment"].as_str().unwrap());
        assert_eq!(r.wrapped.kek, kek_ref(f));
        for (field, value) in [
            ("created_at", r.created_at),
            ("encrypt_until", r.encrypt_until),
            ("decrypt_until", r.decrypt_until),
            ("max_uses", r.max_uses),
            ("uses", r.uses),
        ] {
            assert_eq!(f[field].as_u64().unwrap(), value, "{name}: {field}");
        }
        assert_eq!(r.wrapped.bytes, bytes(&f["wrapped_hex"]));
        assert_eq!(r.to_bytes(), raw, "{name}: encode");
        by_name.insert(name.to_owned(), r);
    }
    for v in doc["negative"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        assert!(
            WrappedDek::from_bytes(&bytes(&v["record_hex"])).is_err(),
            "{name}"
        );
    }
    let file = &doc["file"];
    let file_bytes = bytes(&file["file_hex"]);
    let decoded = hazmat::decode_key_store_file(&file_bytes).unwrap();
    let want: Vec<_> = file["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| by_name[n.as_str().unwrap()].clone())
        .collect();
    assert_eq!(decoded, want);
    assert_eq!(hazmat::encode_key_store_file(&want), file_bytes);
    for v in doc["file_negative"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        assert!(
            hazmat::decode_key_store_file(&bytes(&v["file_hex"])).is_err(),
            "{name}"
        );
    }
}

#[test]
fn blind_index_v1_vectors() {
    let doc = load("blind_index_v1.json");
    let rules = PanRules::with_min_digits(8).unwrap();
    for v in doc["vectors"].as_array().unwrap() {
        let pan = Pan::parse_with(v["pan"].as_str().unwrap(), &rules).unwrap();
        let got = hazmat::blind_index_with_key(&hex32(&v["key_hex"]), &pan);
        assert_eq!(hex::encode(got), v["index_hex"].as_str().unwrap());
    }
    for v in doc["index_key_ids"].as_array().unwrap() {
        let id = hazmat::index_key_id(
            v["environment"].as_str().unwrap(),
            v["scope"].as_str().unwrap(),
            v["version"].as_u64().unwrap() as u32,
        )
        .unwrap();
        assert_eq!(hex::encode(id.as_bytes()), v["id_hex"].as_str().unwrap());
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn record_v2_vectors() {
    use panseal::KeyService;
    let doc = load("record_v2.json");
    let env = Environment::new(doc["environment"].as_str().unwrap()).unwrap();
    let ks = LocalKeyService::from_kek_bytes_insecure(env, hex32(&doc["kek_hex"]));
    let rt = rt();
    let mut accepted = 0;
    for v in doc["vectors"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let raw = bytes(&v["record_hex"]);
        let r = WrappedDek::from_bytes(&raw).unwrap();
        assert_eq!(r.to_bytes(), raw, "{name}");
        assert_eq!(raw[0], 2, "{name}");
        assert_eq!(r.sequence, v["sequence"].as_u64().unwrap(), "{name}");
        assert_eq!(
            hex::encode(r.signed_bytes()),
            v["signed_hex"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            hex::encode(r.tag.unwrap().0),
            v["tag_hex"].as_str().unwrap(),
            "{name}"
        );
        rt.block_on(ks.verify_record(&r)).unwrap();
        accepted += 1;
    }
    assert_eq!(accepted, 4);
    let mut refused = 0;
    let negatives = doc["negative"].as_array().unwrap();
    for v in negatives {
        let name = v["name"].as_str().unwrap();
        let r = WrappedDek::from_bytes(&bytes(&v["record_hex"])).unwrap();
        match rt.block_on(ks.verify_record(&r)) {
            Err(KeyServiceError::RecordTampered(_)) => refused += 1,
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(refused, negatives.len());
    assert!(refused >= 15);
}

#[test]
fn blind_index_v2_vectors_through_the_key_service() {
    use panseal::KeyService;
    let doc = load("blind_index_v2.json");
    let env = Environment::new(doc["environment"].as_str().unwrap()).unwrap();
    let ks = LocalKeyService::from_kek_bytes_insecure(env, hex32(&doc["kek_hex"]));
    let rt = rt();
    let access = panseal::Access::new("vectors", "test").unwrap();
    let mut created = std::collections::HashSet::new();
    let keys = doc["index_keys"].as_array().unwrap();
    for k in keys {
        let scope = Scope::new(k["scope"].as_str().unwrap()).unwrap();
        if created.insert(scope.clone()) {
            for _ in 0..2 {
                rt.block_on(ks.create_index_key(&scope)).unwrap();
            }
        }
    }
    let mut matched = 0;
    for v in doc["vectors"].as_array().unwrap() {
        let scope = Scope::new(v["scope"].as_str().unwrap()).unwrap();
        let version = v["version"].as_u64().unwrap() as u32;
        let pan = Pan::parse(v["pan"].as_str().unwrap()).unwrap();
        let got = rt
            .block_on(ks.blind_index(&scope, &[version], &[&pan], &access))
            .unwrap();
        assert_eq!(hex::encode(got[0]), v["index_hex"].as_str().unwrap());
        // And through Panseal, with the service-held key id.
        let ps = rt
            .block_on(
                panseal::Panseal::builder()
                    .key_service(ks.clone())
                    .key_store(panseal::MemoryKeyStore::new())
                    .environment("test")
                    .scope(scope.as_str())
                    .build(),
            )
            .unwrap();
        let all = rt.block_on(ps.blind_indexes(&pan)).unwrap();
        let hit = all.iter().find(|b| b.version() == version).unwrap();
        assert_eq!(hit.to_hex(), v["index_hex"].as_str().unwrap());
        let key = keys
            .iter()
            .find(|k| k["scope"] == v["scope"] && k["version"] == v["version"])
            .unwrap();
        assert_eq!(
            hex::encode(hit.key_id().as_bytes()),
            key["key_id_hex"].as_str().unwrap()
        );
        matched += 1;
    }
    assert_eq!(matched, 16);
}

// ----- ingest_v1.json: FORMAT.md §17, made by @hpke/core under Node ----------

fn ingest_key(doc: &Value, name: &str) -> hazmat::IngestPrivateKey {
    let k = &doc["keys"][name];
    let key = hazmat::IngestPrivateKey::from_scalar(
        &Environment::new(k["environment"].as_str().unwrap()).unwrap(),
        &Scope::new(k["scope"].as_str().unwrap()).unwrap(),
        k["version"].as_u64().unwrap() as u32,
        &hex32(&k["scalar_hex"]),
    )
    .unwrap();
    // The public key the generator derived, its text form and key tag.
    assert_eq!(
        key.public_key().as_bytes().to_vec(),
        bytes(&k["public_key_hex"]),
        "{name}"
    );
    assert_eq!(
        key.public_key().to_text(),
        k["public_key_text"].as_str().unwrap()
    );
    assert_eq!(
        &panseal::IngestPublicKey::from_text(k["public_key_text"].as_str().unwrap()).unwrap(),
        key.public_key()
    );
    assert_eq!(
        key.public_key().key_tag().to_vec(),
        bytes(&k["key_tag_hex"])
    );
    key
}

#[test]
fn ingest_v1_positive_vectors_open() {
    let doc = load("ingest_v1.json");
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 6);
    let mut opened = 0;
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let key = ingest_key(&doc, v["key"].as_str().unwrap());
        let ct = bytes(&v["ciphertext_hex"]);
        assert_eq!(ct.len(), panseal::INGEST_LEN, "{name}");
        let sealed = panseal::IngestSealed::from_bytes(&ct).unwrap();
        let text = v["text"].as_str().unwrap();
        assert_eq!(text.len(), panseal::INGEST_TEXT_LEN);
        assert_eq!(sealed.to_text(), text, "{name}");
        assert_eq!(panseal::IngestSealed::from_text(text).unwrap(), sealed);
        assert!(matches!(
            panseal::StoredPan::from_text(text).unwrap(),
            panseal::StoredPan::Ingest(_)
        ));
        assert_eq!(sealed.key_version(), key.public_key().version());
        let ctx = context(&v["context"]);
        // FORMAT §17 AAD = header || context (§2).
        let mut aad = ct[..10].to_vec();
        aad.extend_from_slice(ctx.encoded());
        assert_eq!(aad, bytes(&v["aad_hex"]), "{name}");
        assert_eq!(
            hazmat::pack_pan(
                &Pan::parse_with(
                    v["pan"].as_str().unwrap(),
                    &PanRules::with_min_digits(8).unwrap()
                )
                .unwrap()
            )
            .to_vec(),
            bytes(&v["packed_hex"])
        );
        let pan = key.open(&sealed, &ctx).unwrap();
        assert_eq!(pan.expose_digits(), v["pan"].as_str().unwrap(), "{name}");
        opened += 1;
    }
    assert_eq!(opened, vectors.len());
}

#[test]
fn ingest_v1_negative_vectors_are_refused_with_their_class() {
    let doc = load("ingest_v1.json");
    let negative = doc["negative"].as_array().unwrap();
    assert!(negative.len() >= 20);
    let mut refused = 0;
    for v in negative {
        let name = v["name"].as_str().unwrap();
        let expect = v["expect"].as_str().unwrap();
        let key = ingest_key(&doc, v["key"].as_str().unwrap());
        let parsed = match (v.get("ciphertext_hex"), v.get("text")) {
            (Some(h), _) => panseal::IngestSealed::from_bytes(&bytes(h)),
            (_, Some(t)) => panseal::IngestSealed::from_text(t.as_str().unwrap()),
            _ => panic!("{name}: no input"),
        };
        let result = parsed.and_then(|s| key.open(&s, &context(&v["context"])));
        let ok = match expect {
            "format" => matches!(result, Err(Error::Format(_))),
            "payload" => matches!(result, Err(Error::Format(FormatError::Payload))),
            "decryption" => matches!(result, Err(Error::Decryption)),
            "key_mismatch" => matches!(
                result,
                Err(Error::Key(panseal::KeyError::IngestKeyMismatch))
            ),
            other => panic!("{name}: unknown class {other}"),
        };
        assert!(ok, "{name}: expected {expect}, got {result:?}");
        refused += 1;
    }
    assert_eq!(refused, negative.len(), "0 negative vectors accepted");
}

#[test]
fn ingest_v1_public_keys_off_the_curve_are_refused() {
    let doc = load("ingest_v1.json");
    let env = Environment::new("test").unwrap();
    let scope = Scope::new("merchant-42").unwrap();
    let cases = doc["public_key_negative"].as_array().unwrap();
    let mut refused = 0;
    for v in cases {
        let name = v["name"].as_str().unwrap();
        let r = match (v.get("public_key_hex"), v.get("public_key_text")) {
            (Some(h), _) => panseal::IngestPublicKey::from_parts(&env, &scope, 1, &bytes(h)),
            (_, Some(t)) => panseal::IngestPublicKey::from_text(t.as_str().unwrap()),
            _ => panic!("{name}: no input"),
        };
        assert!(
            matches!(r, Err(Error::Format(FormatError::PublicKey))),
            "{name}: {r:?}"
        );
        refused += 1;
    }
    assert_eq!(refused, cases.len());
}

/// The committed `ingest_v1.json` is what the independent generator
/// makes (`node tests/js/gen_ingest_vectors.mjs --check`), where Node and
/// `tests/js/node_modules` are installed (`npm ci --prefix tests/js`).
#[test]
fn ingest_v1_reproduces_from_the_node_generator() {
    let root = env!("CARGO_MANIFEST_DIR");
    if !std::path::Path::new(&format!("{root}/tests/js/node_modules/@hpke/core")).exists() {
        eprintln!("skipped: tests/js/node_modules not installed (npm ci --prefix tests/js)");
        return;
    }
    let out = std::process::Command::new("node")
        .arg(format!("{root}/tests/js/gen_ingest_vectors.mjs"))
        .arg("--check")
        .output();
    match out {
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("skipped: node not runnable ({e})"),
    }
}

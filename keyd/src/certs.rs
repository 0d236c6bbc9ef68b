//! `gen-dev-certs`: a development CA, a server certificate and client
//! certificates, so examples and tests need no manual step. Not for
//! production: the CA key is written next to the certificates.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};

fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), String> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `ca.pem`, `ca.key.pem`, `server.pem`, `server.key.pem` and, per
/// client name, `NAME.pem`, `NAME.key.pem` and `NAME.sha256` (the
/// certificate fingerprint for `cert_sha256`).
pub(crate) fn generate(out: &Path, hosts: &[String], clients: &[String]) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let err = |e: rcgen::Error| e.to_string();

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "panseal-keyd development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    write_new(&out.join("ca.pem"), &ca_cert.pem(), false)?;
    write_new(&out.join("ca.key.pem"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(hosts.iter().cloned());
    let mut server = CertificateParams::new(names).map_err(err)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "panseal-keyd");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().map_err(err)?;
    let server_cert = server.signed_by(&server_key, &issuer).map_err(err)?;
    write_new(&out.join("server.pem"), &server_cert.pem(), false)?;
    write_new(
        &out.join("server.key.pem"),
        &server_key.serialize_pem(),
        true,
    )?;

    for name in clients {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
        {
            return Err(format!("client name {name:?}: use A-Z a-z 0-9 . _ - @"));
        }
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, name.as_str());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &issuer).map_err(err)?;
        write_new(&out.join(format!("{name}.pem")), &cert.pem(), false)?;
        write_new(
            &out.join(format!("{name}.key.pem")),
            &key.serialize_pem(),
            true,
        )?;
        let fp = hex::encode(Sha256::digest(cert.der().as_ref()));
        write_new(
            &out.join(format!("{name}.sha256")),
            &format!("{fp}\n"),
            false,
        )?;
    }
    Ok(())
}

/// SHA-256 of the first certificate in a PEM file, lowercase hex: what
/// `panseal-keyd fingerprint` prints and `cert_sha256` in `keyd.toml` holds.
pub(crate) fn fingerprint_file(path: &Path) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(hex::encode(Sha256::digest(der.as_ref())))
}

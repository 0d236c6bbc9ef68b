// PCI DSS 3.7.1: without the `hazmat-test-keys` feature there is no way to
// build a DEK from caller-supplied bytes.
fn main() {
    let _ = panseal::Dek::from_bytes_insecure([0u8; 32]);
}

// PCI DSS 3.6.1.2: a plaintext DEK has no serialization.
fn main() {
    let dek = panseal::Dek::generate();
    let _ = serde_json::to_string(&dek);
}

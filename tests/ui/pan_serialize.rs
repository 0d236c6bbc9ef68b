// A PAN in the clear cannot be serialized (store a SealedPan instead).
fn main() {
    let pan = panseal::Pan::parse("4111111111111111").unwrap();
    let _ = serde_json::to_string(&pan);
}

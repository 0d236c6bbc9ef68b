// PCI DSS 3.3.1.2: a card verification code cannot be serialized.
fn main() {
    let cvv = panseal::Cvv::parse("123").unwrap();
    let _ = serde_json::to_string(&cvv);
}

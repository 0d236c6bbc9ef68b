// A card verification code cannot be copied: it is consumed once.
fn main() {
    let cvv = panseal::Cvv::parse("123").unwrap();
    let copy = cvv.clone();
    copy.use_once(|_| ());
}

// `use_once` consumes the code: a second use does not compile.
fn main() {
    let cvv = panseal::Cvv::parse("123").unwrap();
    cvv.use_once(|_| ());
    cvv.use_once(|_| ());
}

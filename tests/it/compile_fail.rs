//! Compile-fail tests: what the type system forbids (PCI DSS 3.3.1.2,
//! 3.6.1.2, 3.7.1). The expected compiler output is in `tests/ui/*.stderr`.

#[test]
fn forbidden_uses_do_not_compile() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/cvv_serialize.rs");
    t.compile_fail("tests/ui/cvv_clone.rs");
    t.compile_fail("tests/ui/cvv_use_twice.rs");
    t.compile_fail("tests/ui/dek_serialize.rs");
    t.compile_fail("tests/ui/pan_serialize.rs");
    // Only without the feature that adds the constructor.
    #[cfg(not(feature = "hazmat-test-keys"))]
    t.compile_fail("tests/ui/dek_from_bytes.rs");
}

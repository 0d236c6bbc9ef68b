//! `scripts/cinstall.sh` sets `PANSEAL_FFI_SONAME` so the installed shared
//! library carries its soname (`libpanseal.so.0`); in-tree builds have none.
fn main() {
    println!("cargo:rerun-if-env-changed=PANSEAL_FFI_SONAME");
    if let Ok(soname) = std::env::var("PANSEAL_FFI_SONAME") {
        if !soname.is_empty() && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
            println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
        }
    }
}

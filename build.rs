//! Finds the system's libjpeg-turbo (Debian: `libturbojpeg0-dev`) through
//! pkg-config. When it is there, JPEGs decode through it (faster, and at
//! reduced DCT scales: see `src/photo.rs`); when it is not, the build uses
//! the pure-Rust decoders alone and works the same otherwise.
//! `FLUKEID_NO_TURBOJPEG=1` builds without it even where it is installed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(turbojpeg)");
    println!("cargo::rerun-if-env-changed=FLUKEID_NO_TURBOJPEG");
    if std::env::var_os("FLUKEID_NO_TURBOJPEG").is_some_and(|v| !v.is_empty() && v != "0") {
        println!("cargo::warning=FLUKEID_NO_TURBOJPEG is set: JPEGs decode with zune-jpeg");
        return;
    }
    // Not finding it is not an error: the pure-Rust decoders take over.
    let found = pkg_config::Config::new()
        .atleast_version("2.0")
        .probe("libturbojpeg")
        .is_ok();
    if found {
        println!("cargo::rustc-cfg=turbojpeg");
    }
}

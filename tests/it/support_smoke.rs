use capvirt_tests::{artifacts, capvirt, test_plugin_dir, TempDir};

#[test]
fn built_binary_lists_default_domain() {
    let state = TempDir::new().unwrap_or_else(|e| panic!("{e}"));
    let out = capvirt(test_plugin_dir(), state.path()).arg("list").output().unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("test   running"));
    assert!(artifacts().fixture_plugin.exists());
}

//! The fuzz targets' corpora (`fuzz/corpus/<target>/`, seeds plus what fuzzing found, crashes
//! included as regressions) replayed through the same entry points on every test run: no
//! input may panic or hang a decoder. Live fuzzing is `cargo fuzz` (README, "Fuzzing").

use std::path::Path;

#[test]
fn every_corpus_input_is_decoded_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in llm_worker::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_file() {
                target(&std::fs::read(&path).unwrap());
                inputs += 1;
            }
        }
        assert!(inputs > 0, "no corpus for {name}");
    }
}

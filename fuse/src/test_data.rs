//! Test data shared by the unit tests: incompressible bytes and tar layers of regular files.

/// Bytes that repeat nowhere within a chunk's distance, so no two chunks dedup.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tar stream of regular files (mode 0644, owner 0, mtime 0).
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *data).unwrap_or_else(|e| panic!("tar of {path}: {e}"));
    }
    builder.into_inner().unwrap_or_else(|e| panic!("tar: {e}"))
}

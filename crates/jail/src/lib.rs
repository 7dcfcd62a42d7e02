//! Linux isolation of one process tree.

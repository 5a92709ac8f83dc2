//! Seed mode: an agent that always goes back to source and serves many children. It arrives with the P2P work.

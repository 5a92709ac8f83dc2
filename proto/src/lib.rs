//! Protocol definitions (scheduler API, peer protocol) and their generated code; the `.proto` files arrive with the P2P work.

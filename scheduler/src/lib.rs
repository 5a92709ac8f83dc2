//! The scheduler: hosts, tasks, piece bitmaps and parent selection for peer-to-peer downloads. It arrives with the P2P work.

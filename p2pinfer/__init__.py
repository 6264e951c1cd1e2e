"""p2pinfer: peer-to-peer AI inference."""

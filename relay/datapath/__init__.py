"""The data path: agent sessions, the pairing of a Dial with an Accept, and the splice between them."""

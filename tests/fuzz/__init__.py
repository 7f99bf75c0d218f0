"""Network fuzzing of ftpfix against the real legacy servers (see ``netfuzz``)."""

"""Operations: job specs, cluster submission, scheduled recompression."""

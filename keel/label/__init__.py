"""Active learning (`keel label RUN_DIR --pool FILE`): uncertainty sampling picks the next texts for a person to
label, in the terminal or a small web page on loopback; labels are stored append-only and a linear probe on the
run's frozen embeddings is retrained between rounds."""

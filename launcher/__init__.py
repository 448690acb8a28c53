"""Recipe launcher: compose → validate → render → submit. Never imports torch."""

"""Terminal output: ANSI tables and text, standard library only (rich would add ~80 ms to `ls`)."""

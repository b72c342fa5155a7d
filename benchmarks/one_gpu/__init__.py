"""Test and benchmark tooling: run N xDiT ranks on one GPU over gloo (see :mod:`.launch`). Not package runtime."""

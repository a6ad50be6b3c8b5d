"""Device profiles (devices/*.toml), runners, estimates and the FPS matrix."""

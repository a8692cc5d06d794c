"""The core under everything: reading others' files, writing the user's files, and the plugin registry."""

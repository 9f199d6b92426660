"""The sandstream worker (arq): runs agent turns, their providers and their tools."""

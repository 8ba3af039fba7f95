"""steadysocket.model: the Sans-I/O core. Nothing here performs I/O or reads a clock."""

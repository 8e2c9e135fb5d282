"""The lowest floor: parts every room shares, importing nothing else of the project.

  errors.ConfigError, errors.DataError   the error roots: a config value at fault (its key and file as fields),
                                          bad input data
  typed_config    typed dataclass configs from YAML with `a.b=value` overrides
  atomic          files that appear whole or not at all (temp file, then rename), their mode and checksum
  staging         folders replaced whole (build beside, then switch)
  tables          the plain-text tables reports print
"""

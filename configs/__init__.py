"""The shipped run configs (YAML), a package so that an installed project carries them as package
data; ``resources.settings.config_file`` resolves a name against this folder."""

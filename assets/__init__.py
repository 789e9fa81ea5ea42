"""Things that persist: preference data, models, reports, their checks and schemas."""

std = "max"
files["spec"] = { std = "+busted" }
max_line_length = 130
exclude_files = { "build/" }
files["examples/testing_spec.lua"] = { std = "+busted" }

-- Prepares etcd's own .proto files for protoc-c.
--
-- usage: lua proto/prepare.lua <etcd source root> <output dir>
--
-- etcd's protos import gogoproto and google.api annotations, which protoc-c
-- neither has nor needs. This script drops those imports, every file-level
-- `option (gogoproto.…)`, and every `option (google.api.http) = { … };` block
-- (a brace counter, since those blocks nest braces), and flattens the
-- `etcd/...` import paths so the three files compile side by side.
-- Nothing of etcd's source is committed to this project: it is read from an
-- etcd tree at build time (see the Makefile's ETCD_PROTO_DIR).

local src_root, out_dir = arg[1], arg[2]
if not src_root or not out_dir then
  io.stderr:write("usage: prepare.lua <etcd source root> <output dir>\n")
  os.exit(2)
end

-- etcd 3.4 paths -> flat names
local files = {
  { "mvcc/mvccpb/kv.proto", "kv.proto" },
  { "auth/authpb/auth.proto", "auth.proto" },
  { "etcdserver/etcdserverpb/rpc.proto", "rpc.proto" },
}

local function read(path)
  local f, err = io.open(path, "rb")
  if not f then error(err, 0) end
  local text = f:read("*a")
  f:close()
  return text
end

-- Removes every `option (google.api.http) = { ... };`, counting braces so
-- nested blocks (additional_bindings) are removed whole.
local function strip_http_options(text)
  local out, pos = {}, 1
  while true do
    local s, e = text:find("option%s*%(google%.api%.http%)%s*=%s*{", pos)
    if not s then break end
    out[#out + 1] = text:sub(pos, s - 1)
    local depth, i = 1, e + 1
    while depth > 0 do
      local c = text:sub(i, i)
      if c == "" then error("unbalanced braces in google.api.http option", 0) end
      if c == "{" then depth = depth + 1 elseif c == "}" then depth = depth - 1 end
      i = i + 1
    end
    -- swallow the trailing ';'
    local _, semi = text:find("^%s*;", i)
    pos = (semi or i - 1) + 1
  end
  out[#out + 1] = text:sub(pos)
  return table.concat(out)
end

local function prepare(text)
  text = strip_http_options(text)
  local lines = {}
  for line in (text .. "\n"):gmatch("(.-)\r?\n") do
    if line:match('^%s*import%s+"gogoproto/') or line:match('^%s*import%s+"google/')
       or line:match("^%s*option%s*%(gogoproto%.") then
      line = nil
    else
      line = line:gsub('import%s+"etcd/[%w_/]*/([%w_]+%.proto)"', 'import "%1"')
    end
    lines[#lines + 1] = line
  end
  return table.concat(lines, "\n")
end

for _, pair in ipairs(files) do
  local text = prepare(read(src_root .. "/" .. pair[1]))
  if text:find("gogoproto") or text:find("google%.api") then
    error(pair[1] .. ": an annotation survived preparation", 0)
  end
  local f = assert(io.open(out_dir .. "/" .. pair[2], "wb"))
  f:write(text)
  f:close()
end

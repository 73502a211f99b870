"""The Lua scripts of the Redis Store (``store_redis.py``), one per operation.

Each script is atomic on the Redis instance: a batch of accepts, acks or
deliveries is applied whole or not at all, and a retry after a lost reply
meets either nothing or the whole batch (dedup then answers the original
msg_id).  The key layout is in ``store_redis.py``'s docstring.

Conventions, which every script follows:

* ``ARGV[1]`` is the key prefix and ``ARGV[2]`` a candidate epoch; the
  common header (:data:`_HEADER`) reads ``<p>:epoch`` and, when it is gone
  (a flushed or lost instance), sets the candidate, so the first script to
  run after the loss chooses the new epoch and every worker converges on
  it.  Every script returns ``{epoch, answer}``; the caller compares the
  epoch with the one it holds.  No extra round trip per call.
* Times, refs and other values that must come back bit-exact travel as the
  strings Python made (``repr(float)``, ``str(int)``) and are stored as
  they came: Lua's ``tostring`` keeps only 14 digits, and a ref uses all 64
  bits, more than a Lua number holds.  Comparisons use ``tonumber`` (IEEE
  doubles, as Python compares).
* Keys are built here from the prefix and the tenant (``{<tenant>}`` is the
  hash tag), which Redis standalone allows; ``store_redis.py`` says how
  each script would be split by slot under Redis Cluster.
"""

from __future__ import annotations

_HEADER = """
local P = ARGV[1]
local epoch = redis.call("GET", P .. ":epoch")
if not epoch then
  redis.call("SET", P .. ":epoch", ARGV[2])
  epoch = ARGV[2]
end
local function tenant_of(address)
  local _, _, t = string.find(address, "^[^:]*:([^/]*)")
  return t or ""
end
local function base(tenant)
  return P .. ":{" .. tenant .. "}:s"
end
-- An inbox entry's member: msg_id, recipient index, the message's tenant.
local function entry_of(member)
  local _, _, id, i, tenant = string.find(member, "^(%d+):(%d+):(.*)$")
  return id, i, base(tenant)
end
-- A recipient's entry ends (acked, rejected, expired): one less open entry
-- of its message; the message is done once none is open, at the latest end.
-- B is the message's tenant's base.
local function finish(B, m, id, i, state, at, reason)
  redis.call("HSET", m, "s" .. i, state)
  if state == "acked" then
    redis.call("HSET", m, "a" .. i, at)
  else
    redis.call("HSET", m, "e" .. i, at, "w" .. i, reason)
  end
  local open = redis.call("HINCRBY", m, "open", -1)
  local done = redis.call("HGET", m, "done")
  if tonumber(at) > tonumber(done) then
    redis.call("HSET", m, "done", at)
    done = at
  end
  redis.call("HINCRBY", B .. ":n", "unacked", -1)
  if open <= 0 then
    redis.call("ZREM", B .. ":exp", id)
    redis.call("ZADD", B .. ":done", done, id)
  end
end
local function dead_letter(B, m, id, terminal, lane, seq, reason, at)
  local f = redis.call("HMGET", m, "kind", "sender", "ref", "receipt")
  local n = redis.call("INCR", P .. ":dlseq")
  local enc = cjson.encode({id, terminal, tostring(lane), tostring(seq), f[1], reason, at,
                            f[2], f[3], f[4]})
  redis.call("ZADD", B .. ":dead", n, n .. "\\n" .. enc)
  redis.call("HINCRBY", B .. ":n", "dead", 1)
  return enc
end
"""

# ARGV[3] dedup window; ARGV[4] item count; then per item: tenant, sender,
# ref, lane, kind, to, body, created, expires, receipt, n, n recipients.
# Answer: per item {msg_id, duplicate, seq per recipient...}.
ACCEPT = _HEADER + """
local window = tonumber(ARGV[3])
local out = {}
local a = 5
for item = 1, tonumber(ARGV[4]) do
  local tenant, sender, ref, lane = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local created, n = ARGV[a + 7], tonumber(ARGV[a + 10])
  local B = base(tenant)
  local dkey = sender .. "\\n" .. ref
  local original = false
  if ref ~= "0" then
    local seen = redis.call("HGET", B .. ":dd", dkey)
    if seen then
      local at = tonumber(redis.call("ZSCORE", B .. ":ddt", dkey))
      if tonumber(created) - at <= window then original = seen end
    end
  end
  if original then
    out[item] = {tonumber(original), 1}
  else
    local id = redis.call("INCR", P .. ":msgid")
    local m = B .. ":m:" .. id
    local body = ARGV[a + 6]
    redis.call("HSET", m, "tenant", tenant, "sender", sender, "ref", ref, "lane", lane,
               "kind", ARGV[a + 4], "to", ARGV[a + 5], "body", body, "created", created,
               "expires", ARGV[a + 8], "receipt", ARGV[a + 9], "n", n, "open", n, "done", "0")
    local answer = {id, 0}
    for i = 1, n do
      local t = ARGV[a + 10 + i]
      -- (The node expands addresses within the tenant; the contract lets a
      -- recipient be of another one, whose keys hold its inbox.)
      local tb = base(tenant_of(t))
      if tb ~= B then redis.call("SADD", P .. ":tenants", tenant_of(t)) end
      local seq = redis.call("HINCRBY", tb .. ":pos:" .. t, "l" .. lane, 1)
      redis.call("ZADD", tb .. ":q:" .. lane .. ":" .. t, seq, id .. ":" .. i .. ":" .. tenant)
      redis.call("HSET", m, "t" .. i, t, "q" .. i, seq, "s" .. i, "stored")
      answer[i + 2] = seq
    end
    if n > 0 then
      redis.call("ZADD", B .. ":exp", ARGV[a + 8], id)
    else
      redis.call("ZADD", B .. ":done", 0, id)
    end
    redis.call("HINCRBY", B .. ":n", "messages", 1)
    redis.call("HINCRBY", B .. ":n", "unacked", n)
    redis.call("HINCRBY", B .. ":n", "bytes", #body)
    if ref ~= "0" then
      redis.call("HSET", B .. ":dd", dkey, id)
      redis.call("ZADD", B .. ":ddt", created, dkey)
    end
    redis.call("SADD", P .. ":tenants", tenant)
    out[item] = answer
  end
  a = a + 11 + n
end
return {epoch, out}
"""

# ARGV[3] terminal, ARGV[4] lane, ARGV[5] after, ARGV[6] limit.
# Answer: per entry {seq, msg_id, kind, body, delivered, expires}.
INBOX = _HEADER + """
local t, lane = ARGV[3], ARGV[4]
local B = base(tenant_of(t))
local out = {}
local found = redis.call("ZRANGEBYSCORE", B .. ":q:" .. lane .. ":" .. t, "(" .. ARGV[5], "+inf",
                         "WITHSCORES", "LIMIT", 0, tonumber(ARGV[6]))
for k = 1, #found, 2 do
  local id, i, MB = entry_of(found[k])
  local f = redis.call("HMGET", MB .. ":m:" .. id, "kind", "body", "s" .. i, "expires")
  out[#out + 1] = {tonumber(found[k + 1]), tonumber(id), f[1], f[2],
                   f[3] == "delivered" and 1 or 0, f[4]}
end
return {epoch, out}
"""

# ARGV[3] terminal.  Answer: {acked P0, last P0, acked P1, last P1}.
POSITIONS = _HEADER + """
local t = ARGV[3]
local f = redis.call("HMGET", base(tenant_of(t)) .. ":pos:" .. t, "a0", "l0", "a1", "l1")
return {epoch, {tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0,
                tonumber(f[4]) or 0}}
"""

# ARGV[3] now; then (terminal, lane, seq) triples.  Answer: receipts
# {msg_id, terminal, sender, ref} of newly acked messages that asked for one.
ACK = _HEADER + """
local now = ARGV[3]
local out = {}
for a = 4, #ARGV, 3 do
  local t, lane, seq = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local B = base(tenant_of(t))
  local pos = B .. ":pos:" .. t
  local f = redis.call("HMGET", pos, "a" .. lane, "l" .. lane)
  local acked, last = tonumber(f[1]) or 0, tonumber(f[2])
  if last and seq > acked then
    if seq > last then seq = last end
    local q = B .. ":q:" .. lane .. ":" .. t
    for _, member in ipairs(redis.call("ZRANGEBYSCORE", q, "(" .. acked, seq)) do
      local id, i, MB = entry_of(member)
      local m = MB .. ":m:" .. id
      finish(MB, m, id, i, "acked", now, "")
      local r = redis.call("HMGET", m, "receipt", "sender", "ref")
      if r[1] == "1" then out[#out + 1] = {tonumber(id), t, r[2], r[3]} end
    end
    redis.call("ZREMRANGEBYSCORE", q, "-inf", seq)
    redis.call("HSET", pos, "a" .. lane, seq)
  end
end
return {epoch, out}
"""

# ARGV[3] now; then (terminal, lane, first, last) quadruples.  Answer: the
# receipts of first deliveries, as ACK's.
DELIVERED = _HEADER + """
local now = ARGV[3]
local out = {}
for a = 4, #ARGV, 4 do
  local t, lane = ARGV[a], ARGV[a + 1]
  local B = base(tenant_of(t))
  local q = B .. ":q:" .. lane .. ":" .. t
  for _, member in ipairs(redis.call("ZRANGEBYSCORE", q, ARGV[a + 2], ARGV[a + 3])) do
    local id, i, MB = entry_of(member)
    local m = MB .. ":m:" .. id
    if redis.call("HGET", m, "s" .. i) == "stored" then
      redis.call("HSET", m, "s" .. i, "delivered", "d" .. i, now)
      local r = redis.call("HMGET", m, "receipt", "sender", "ref")
      if r[1] == "1" then out[#out + 1] = {tonumber(id), t, r[2], r[3]} end
    end
  end
end
return {epoch, out}
"""

# ARGV[3] terminal, ARGV[4] lane, ARGV[5] seq, ARGV[6] reason, ARGV[7] now.
# Answer: the dead letter (JSON) or false.
REJECT = _HEADER + """
local t, lane, seq = ARGV[3], ARGV[4], ARGV[5]
local B = base(tenant_of(t))
local q = B .. ":q:" .. lane .. ":" .. t
local found = redis.call("ZRANGEBYSCORE", q, seq, seq)
if #found == 0 then return {epoch, false} end
local id, i, MB = entry_of(found[1])
local m = MB .. ":m:" .. id
finish(MB, m, id, i, "rejected", ARGV[7], ARGV[6])
redis.call("ZREM", q, found[1])
return {epoch, dead_letter(B, m, id, t, lane, seq, ARGV[6], ARGV[7])}
"""

# ARGV[3] now.  Every tenant's messages expired by now, in msg_id order;
# each open entry is dead-lettered.  Answer: the dead letters (JSON).
EXPIRE = _HEADER + """
local now = ARGV[3]
local due = {}
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  for _, id in ipairs(redis.call("ZRANGEBYSCORE", base(tenant) .. ":exp", "-inf", now)) do
    due[#due + 1] = {tonumber(id), tenant}
  end
end
table.sort(due, function(x, y) return x[1] < y[1] end)
local out = {}
for _, d in ipairs(due) do
  local id, B = tostring(d[1]), base(d[2])
  local m = B .. ":m:" .. id
  local f = redis.call("HMGET", m, "n", "lane")
  local lane = f[2]
  for i = 1, tonumber(f[1]) do
    local r = redis.call("HMGET", m, "s" .. i, "t" .. i, "q" .. i)
    if r[1] == "stored" or r[1] == "delivered" then
      local RB = base(tenant_of(r[2]))
      finish(B, m, id, i, "expired", now, "ttl")
      redis.call("ZREM", RB .. ":q:" .. lane .. ":" .. r[2], id .. ":" .. i .. ":" .. d[2])
      out[#out + 1] = dead_letter(RB, m, id, r[2], lane, r[3], "ttl", now)
    end
  end
end
return {epoch, out}
"""

# ARGV[3] msg_id.  Answer: the message hash as a flat list, or false.
TRACE = _HEADER + """
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local found = redis.call("HGETALL", base(tenant) .. ":m:" .. ARGV[3])
  if #found > 0 then return {epoch, found} end
end
return {epoch, false}
"""

# ARGV[3] tenant ("" = every tenant), ARGV[4] limit.  Answer: the newest
# dead letters (JSON), newest first.
DEAD_LETTERS = _HEADER + """
local limit = tonumber(ARGV[4])
if limit <= 0 then return {epoch, {}} end
local tenants = {ARGV[3]}
if ARGV[3] == "" then tenants = redis.call("SMEMBERS", P .. ":tenants") end
local all = {}
for _, tenant in ipairs(tenants) do
  local got = redis.call("ZREVRANGE", base(tenant) .. ":dead", 0, limit - 1, "WITHSCORES")
  for k = 1, #got, 2 do all[#all + 1] = {tonumber(got[k + 1]), got[k]} end
end
table.sort(all, function(x, y) return x[1] > y[1] end)
local out = {}
for k = 1, math.min(limit, #all) do
  local member = all[k][2]
  out[k] = string.sub(member, string.find(member, "\\n", 1, true) + 1)
end
return {epoch, out}
"""

# ARGV[3] now, ARGV[4] cutoff (now - keep_acked), ARGV[5] dedup window.
# Deletes messages done by the cutoff and dedup entries past the window.
# Answer: how many messages went.
TRIM = _HEADER + """
local now, window = tonumber(ARGV[3]), tonumber(ARGV[5])
local removed = 0
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local B = base(tenant)
  for _, id in ipairs(redis.call("ZRANGEBYSCORE", B .. ":done", "-inf", ARGV[4])) do
    local m = B .. ":m:" .. id
    redis.call("HINCRBY", B .. ":n", "bytes", -redis.call("HSTRLEN", m, "body"))
    redis.call("HINCRBY", B .. ":n", "messages", -1)
    redis.call("DEL", m)
    redis.call("ZREM", B .. ":done", id)
    removed = removed + 1
  end
  -- Candidates by score (one second of slack), then the exact test the
  -- memory store makes (now - created > window) on each.
  local old = redis.call("ZRANGEBYSCORE", B .. ":ddt", "-inf", now - window + 1, "WITHSCORES")
  for k = 1, #old, 2 do
    if now - tonumber(old[k + 1]) > window then
      redis.call("HDEL", B .. ":dd", old[k])
      redis.call("ZREM", B .. ":ddt", old[k])
    end
  end
end
return {epoch, removed}
"""

# Answer: {messages, unacked, dead letters, bytes} summed over tenants.
STATS = _HEADER + """
local sums = {0, 0, 0, 0}
for _, tenant in ipairs(redis.call("SMEMBERS", P .. ":tenants")) do
  local f = redis.call("HMGET", base(tenant) .. ":n", "messages", "unacked", "dead", "bytes")
  for k = 1, 4 do sums[k] = sums[k] + (tonumber(f[k]) or 0) end
end
return {epoch, sums}
"""

# Nothing but the header: what :meth:`RedisStore.open` runs.
EPOCH = _HEADER + """
return {epoch, 0}
"""

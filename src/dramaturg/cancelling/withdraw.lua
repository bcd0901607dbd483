-- Withdraw cancel requests that lapsed (see dramaturg/cancelling/requests.py): a held task
-- that is kicked runs again, even if a request made while it ran (before it ended held)
-- is still kept. A request made after it was held is a deliberate cancel: it stands.
--
-- KEYS[1]: the prefix of request keys, "<namespace>:__cancel__:"; KEYS[2]: the feed.
-- ARGV: the ttl in ms, then pairs: a message id, when its task was held (ms).
-- Returns, per id, 1 when a request was withdrawn, 0 when there was none (or it stands).
--
-- Each request deleted goes into the feed as a withdrawal (fields "w0", "w1", ...), in
-- the same atomic step: a worker that reads the feed after this forgets the request, and
-- a request made again later comes after it in the feed, so it stands.
local out, fields = {}, {}
for i = 2, #ARGV, 2 do
  local id, held_at = ARGV[i], tonumber(ARGV[i + 1])
  local raw = redis.call('GET', KEYS[1] .. id)
  local lapsed = false
  if raw then
    local ok, request = pcall(cjson.decode, raw)
    -- A request that cannot be read is taken as lapsed (the kick is the later decision).
    lapsed = not ok or type(request) ~= 'table' or tonumber(request['at']) == nil
      or tonumber(request['at']) < held_at
  end
  if lapsed then
    redis.call('DEL', KEYS[1] .. id)
    fields[#fields + 1] = 'w' .. tostring(#fields / 2)
    fields[#fields + 1] = id
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if #fields > 0 then
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[1]))
end
return out

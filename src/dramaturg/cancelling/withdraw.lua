-- Withdraw cancel requests (see dramaturg/cancelling/requests.py): a held task that is
-- kicked runs again, even if a request made before it ended held (one that lapsed) is
-- still kept.
--
-- KEYS[1]: the prefix of request keys, "<namespace>:__cancel__:"; KEYS[2]: the feed.
-- ARGV: the ttl in ms, then the message ids.
-- Returns, per id, 1 when a request was withdrawn, 0 when there was none.
--
-- Each request deleted goes into the feed as a withdrawal (fields "w0", "w1", ...), in
-- the same atomic step: a worker that reads the feed after this forgets the request, and
-- a request made again later comes after it in the feed, so it stands.
local out, fields = {}, {}
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('DEL', KEYS[1] .. id) == 1 then
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

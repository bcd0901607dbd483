-- Forgets a dead worker, unless it has beaten since it was found dead.
-- KEYS: heartbeats; ARGV: worker id, cutoff (ms)
local beat = redis.call("zscore", KEYS[1], ARGV[1])
if beat and tonumber(beat) <= tonumber(ARGV[2]) then
    redis.call("zrem", KEYS[1], ARGV[1])
end
return 0

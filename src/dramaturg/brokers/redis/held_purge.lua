-- Deletes held tasks (after held_functions.lua).
-- ARGV: now, "all" or "ids", the ids... Returns how many were deleted.
give_back_stale(ARGV[1])
if ARGV[2] == "all" then
    local count = redis.call("hlen", KEYS[1])
    redis.call("del", KEYS[1], KEYS[2])
    return count
end
local count = 0
for i = 3, #ARGV do
    count = count + redis.call("hdel", KEYS[1], ARGV[i])
    redis.call("zrem", KEYS[2], ARGV[i])
end
return count

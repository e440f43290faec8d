"""teacher_cache"""

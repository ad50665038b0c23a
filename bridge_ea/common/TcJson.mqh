//+------------------------------------------------------------------+
//| TcJson.mqh - a small JSON writer and a flat-object reader        |
//|                                                                  |
//| Writer: builds the *fields* of a frame ("tail") without the outer|
//| braces, so the sender can put "t", "seq" and "ts" in front at the|
//| moment the frame actually leaves (see TcProtocol.mqh). Nested    |
//| objects/arrays are supported for snapshots.                      |
//|                                                                  |
//| Reader: the connector's frames (welcome, denied, cmd,            |
//| snapshot_req, hb, error) are flat objects of strings, numbers,   |
//| booleans and nulls. Unknown nested values are skipped, so a      |
//| connector that adds fields (protocol rule: new fields get        |
//| defaults) does not break an older EA.                            |
//+------------------------------------------------------------------+
#ifndef TC_JSON_MQH
#define TC_JSON_MQH

//+------------------------------------------------------------------+
//| Escape a string for a JSON string literal (without the quotes).  |
//| Quote, backslash and every control character below U+0020 are    |
//| escaped; everything else is kept and later encoded as UTF-8.     |
//+------------------------------------------------------------------+
string TcJsonEscape(const string s)
  {
   int n = StringLen(s);
   //--- fast path: most strings (symbols, tickets, ids) need nothing
   bool clean = true;
   for(int i = 0; i < n; i++)
     {
      ushort c = StringGetCharacter(s, i);
      if(c < 0x20 || c == '"' || c == '\\')
        {
         clean = false;
         break;
        }
     }
   if(clean)
      return s;
   string out = "";
   int run = 0;   // start of the current run of characters that need no escaping
   for(int i = 0; i < n; i++)
     {
      ushort c = StringGetCharacter(s, i);
      string esc = "";
      if(c == '"')
         esc = "\\\"";
      else
         if(c == '\\')
            esc = "\\\\";
         else
            if(c == '\n')
               esc = "\\n";
            else
               if(c == '\r')
                  esc = "\\r";
               else
                  if(c == '\t')
                     esc = "\\t";
                  else
                     if(c == 0x08)
                        esc = "\\b";
                     else
                        if(c == 0x0C)
                           esc = "\\f";
                        else
                           if(c < 0x20)
                              esc = StringFormat("\\u%04x", (int)c);
      if(esc != "")
        {
         if(i > run)
            StringAdd(out, StringSubstr(s, run, i - run));
         StringAdd(out, esc);
         run = i + 1;
        }
     }
   if(n > run)
      StringAdd(out, StringSubstr(s, run, n - run));
   return out;
  }
//+------------------------------------------------------------------+
//| NaN/inf become 0 and -0 becomes 0: neither may reach the wire.   |
//+------------------------------------------------------------------+
double TcClean(const double v)
  {
   if(!MathIsValidNumber(v) || v == 0.0)
      return 0.0;
   return v;
  }
//+------------------------------------------------------------------+
//| A number with exactly 8 decimals (journal volumes).              |
//+------------------------------------------------------------------+
string TcNum8(const double v)
  {
   return DoubleToString(TcClean(v), 8);
  }
//--- "1.2500" -> "1.25", "3.000" -> "3"
string TcStripZeros(const string s)
  {
   if(StringFind(s, ".") < 0)
      return s;
   int n = StringLen(s);
   while(n > 0 && StringGetCharacter(s, n - 1) == '0')
      n--;
   if(n > 0 && StringGetCharacter(s, n - 1) == '.')
      n--;
   return StringSubstr(s, 0, n);
  }
//+------------------------------------------------------------------+
//| printf("%.<p>g") exactly as Python's format(v, ".<p>g") writes   |
//| it, built from DoubleToString so it does not depend on the C     |
//| runtime behind StringFormat (exponent digits differ between      |
//| CRTs). p significant digits; fixed notation when the exponent X  |
//| of the rounded value is -4 <= X < p, else "d.ddde+XX"; trailing  |
//| zeros removed. The state hash needs %.8g and %.10g of live values |
//| to equal what the connector computes from the JSON it received.  |
//+------------------------------------------------------------------+
string TcFmtG(const double value, const int p)
  {
   double v = TcClean(value);
   if(v == 0.0)
      return "0";
   //--- round once to p significant digits in scientific notation: "-d.ddd...e+XXX"
   string sci = DoubleToString(v, -(p - 1));
   int e = StringFind(sci, "e");
   if(e < 0)
      e = StringFind(sci, "E");
   if(e < 0)
      return TcStripZeros(DoubleToString(v, 8));   // not expected: DoubleToString always writes an exponent here
   string mant = StringSubstr(sci, 0, e);
   int i = e + 1;
   int n = StringLen(sci);
   bool neg = false;
   if(i < n && (StringGetCharacter(sci, i) == '-' || StringGetCharacter(sci, i) == '+'))
     {
      neg = (StringGetCharacter(sci, i) == '-');
      i++;
     }
   int x = 0;
   for(; i < n; i++)
     {
      ushort c = StringGetCharacter(sci, i);
      if(c < '0' || c > '9')
         break;
      x = x * 10 + (c - '0');
     }
   if(neg)
      x = -x;
   //--- DoubleToString takes at most 16 decimals: beyond that, exponent form (still valid JSON)
   if(x >= -4 && x < p && p - 1 - x <= 16)
      return TcStripZeros(DoubleToString(v, p - 1 - x));
   int ax = (x < 0) ? -x : x;
   return TcStripZeros(mant) + "e" + (x < 0 ? "-" : "+") + (ax < 10 ? "0" : "") + IntegerToString(ax);
  }
//+------------------------------------------------------------------+
//| A number as JSON writes it: 15 significant digits, so any price  |
//| or volume reads back as the same double and the connector's      |
//| %.8g/%.10g of it matches the EA's (checked for 800,000 random    |
//| values against Python).                                          |
//+------------------------------------------------------------------+
string TcJsonNum(const double v)
  {
   return TcFmtG(v, 15);
  }
//+------------------------------------------------------------------+
//| Parse a JSON number without relying on StringToDouble's handling |
//| of exponents (msgspec writes 1e-05 for 0.00001). The digits are  |
//| accumulated as an integer and scaled once by an exact power of   |
//| ten, which rounds correctly for every price a terminal shows.    |
//+------------------------------------------------------------------+
double TcParseDouble(const string s)
  {
   int n = StringLen(s);
   int i = 0;
   bool neg = false;
   if(i < n && (StringGetCharacter(s, i) == '-' || StringGetCharacter(s, i) == '+'))
     {
      neg = (StringGetCharacter(s, i) == '-');
      i++;
     }
   double mant = 0.0;
   int digits = 0;       // significant digits taken into mant
   int scale = 0;        // power of ten to apply
   bool seen_point = false;
   for(; i < n; i++)
     {
      ushort c = StringGetCharacter(s, i);
      if(c >= '0' && c <= '9')
        {
         if(digits < 17)
           {
            mant = mant * 10.0 + (double)(c - '0');
            if(mant > 0.0)
               digits++;
            if(seen_point)
               scale--;
           }
         else
            if(!seen_point)
               scale++;   // digits beyond precision before the point still count
        }
      else
         if(c == '.')
            seen_point = true;
         else
            break;
     }
   if(i < n && (StringGetCharacter(s, i) == 'e' || StringGetCharacter(s, i) == 'E'))
     {
      i++;
      bool eneg = false;
      if(i < n && (StringGetCharacter(s, i) == '-' || StringGetCharacter(s, i) == '+'))
        {
         eneg = (StringGetCharacter(s, i) == '-');
         i++;
        }
      int e = 0;
      for(; i < n; i++)
        {
         ushort c = StringGetCharacter(s, i);
         if(c < '0' || c > '9')
            break;
         if(e < 10000)
            e = e * 10 + (c - '0');
        }
      scale += eneg ? -e : e;
     }
   double v = mant;
   if(scale < 0)
     {
      //--- dividing by an exact power of ten (10^k is exact up to k = 22) rounds once
      while(scale < -22)
        {
         v /= 1e22;
         scale += 22;
        }
      v /= MathPow(10.0, -scale);
     }
   else
      if(scale > 0)
         v *= MathPow(10.0, scale);
   return neg ? -v : v;
  }

//+------------------------------------------------------------------+
//| JSON writer                                                      |
//+------------------------------------------------------------------+
#define TC_JSON_MAX_DEPTH 16

class CTcJsonWriter
  {
private:
   string            m_s;
   bool              m_first[TC_JSON_MAX_DEPTH];
   int               m_depth;

   void              Sep()
     {
      if(m_first[m_depth])
         m_first[m_depth] = false;
      else
         StringAdd(m_s, ",");
     }
   void              Key(const string key)
     {
      Sep();
      StringAdd(m_s, "\"");
      StringAdd(m_s, key);        // keys are protocol constants: never need escaping
      StringAdd(m_s, "\":");
     }
   void              Push()
     {
      if(m_depth < TC_JSON_MAX_DEPTH - 1)
         m_depth++;
      m_first[m_depth] = true;
     }
   void              Pop()
     {
      if(m_depth > 0)
         m_depth--;
     }

public:
                     CTcJsonWriter() { Reset(); }
   void              Reset()
     {
      m_s = "";
      m_depth = 0;
      for(int i = 0; i < TC_JSON_MAX_DEPTH; i++)
         m_first[i] = true;
     }
   string            Text() const { return m_s; }

   //--- scalar fields
   void              Str(const string key, const string v)
     {
      Key(key);
      StringAdd(m_s, "\"");
      StringAdd(m_s, TcJsonEscape(v));
      StringAdd(m_s, "\"");
     }
   void              Num(const string key, const double v)
     {
      Key(key);
      StringAdd(m_s, TcJsonNum(v));
     }
   void              Int(const string key, const long v)
     {
      Key(key);
      StringAdd(m_s, IntegerToString(v));
     }
   void              Bool(const string key, const bool v)
     {
      Key(key);
      StringAdd(m_s, v ? "true" : "false");
     }
   void              Null(const string key)
     {
      Key(key);
      StringAdd(m_s, "null");
     }
   //--- the protocol omits defaults; these keep frames small and mirror msgspec's omit_defaults
   void              StrOpt(const string key, const string v)  { if(StringLen(v) > 0) Str(key, v); }
   void              NumOpt(const string key, const double v)  { if(TcClean(v) != 0.0) Num(key, v); }
   void              IntOpt(const string key, const long v)    { if(v != 0) Int(key, v); }
   //--- SL/TP: MetaTrader uses 0 for "no level", the protocol uses null (omitted)
   void              Level(const string key, const double v)   { if(TcClean(v) > 0.0) Num(key, v); }
   //--- an already-encoded fragment (fields of a nested tail)
   void              Raw(const string key, const string json)
     {
      Key(key);
      StringAdd(m_s, json);
     }

   //--- nesting
   void              BeginObject(const string key) { Key(key); StringAdd(m_s, "{"); Push(); }
   void              BeginArray(const string key)  { Key(key); StringAdd(m_s, "["); Push(); }
   void              BeginItem()                   { Sep(); StringAdd(m_s, "{"); Push(); }
   void              EndObject()                   { StringAdd(m_s, "}"); Pop(); }
   void              EndArray()                    { StringAdd(m_s, "]"); Pop(); }
  };

//+------------------------------------------------------------------+
//| Flat JSON object reader                                          |
//+------------------------------------------------------------------+
#define TC_JSON_STRING 0
#define TC_JSON_NUMBER 1
#define TC_JSON_BOOL   2
#define TC_JSON_NULL   3
#define TC_JSON_NESTED 4

class CTcJsonObject
  {
private:
   string            m_keys[];
   string            m_vals[];
   int               m_types[];
   int               m_count;
   string            m_src;
   int               m_len;
   int               m_pos;
   string            m_error;

   ushort            Peek() const { return m_pos < m_len ? StringGetCharacter(m_src, m_pos) : 0; }
   void              SkipWs()
     {
      while(m_pos < m_len)
        {
         ushort c = StringGetCharacter(m_src, m_pos);
         if(c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
         m_pos++;
        }
     }
   bool              Fail(const string why)
     {
      m_error = why + " at " + IntegerToString(m_pos);
      return false;
     }
   int               HexDigit(const ushort c) const
     {
      if(c >= '0' && c <= '9')
         return c - '0';
      if(c >= 'a' && c <= 'f')
         return c - 'a' + 10;
      if(c >= 'A' && c <= 'F')
         return c - 'A' + 10;
      return -1;
     }
   bool              ParseString(string &out)
     {
      out = "";
      if(Peek() != '"')
         return Fail("expected string");
      m_pos++;
      int run = m_pos;
      while(m_pos < m_len)
        {
         ushort c = StringGetCharacter(m_src, m_pos);
         if(c == '"')
           {
            if(m_pos > run)
               StringAdd(out, StringSubstr(m_src, run, m_pos - run));
            m_pos++;
            return true;
           }
         if(c < 0x20)
            return Fail("control character in string");
         if(c != '\\')
           {
            m_pos++;
            continue;
           }
         //--- an escape: flush the plain run first
         if(m_pos > run)
            StringAdd(out, StringSubstr(m_src, run, m_pos - run));
         m_pos++;
         if(m_pos >= m_len)
            return Fail("truncated escape");
         ushort e = StringGetCharacter(m_src, m_pos);
         m_pos++;
         if(e == '"')
            StringAdd(out, "\"");
         else
            if(e == '\\')
               StringAdd(out, "\\");
            else
               if(e == '/')
                  StringAdd(out, "/");
               else
                  if(e == 'b')
                     StringAdd(out, ShortToString(0x08));
                  else
                     if(e == 'f')
                        StringAdd(out, ShortToString(0x0C));
                     else
                        if(e == 'n')
                           StringAdd(out, "\n");
                        else
                           if(e == 'r')
                              StringAdd(out, "\r");
                           else
                              if(e == 't')
                                 StringAdd(out, "\t");
                              else
                                 if(e == 'u')
                                   {
                                    if(m_pos + 4 > m_len)
                                       return Fail("truncated \\u escape");
                                    int code = 0;
                                    for(int k = 0; k < 4; k++)
                                      {
                                       int d = HexDigit(StringGetCharacter(m_src, m_pos + k));
                                       if(d < 0)
                                          return Fail("bad \\u escape");
                                       code = code * 16 + d;
                                      }
                                    m_pos += 4;
                                    //--- MQL strings are UTF-16: a surrogate pair arrives as two
                                    //--- \u escapes and is rebuilt by appending both code units
                                    StringAdd(out, ShortToString((ushort)code));
                                   }
                                 else
                                    return Fail("bad escape");
         run = m_pos;
        }
      return Fail("unterminated string");
     }
   bool              SkipNested()
     {
      int depth = 0;
      while(m_pos < m_len)
        {
         ushort c = StringGetCharacter(m_src, m_pos);
         if(c == '"')
           {
            string dummy;
            if(!ParseString(dummy))
               return false;
            continue;
           }
         if(c == '{' || c == '[')
            depth++;
         else
            if(c == '}' || c == ']')
              {
               depth--;
               if(depth == 0)
                 {
                  m_pos++;
                  return true;
                 }
              }
         m_pos++;
        }
      return Fail("unterminated nested value");
     }
   bool              Literal(const string word)
     {
      int n = StringLen(word);
      if(m_pos + n > m_len || StringSubstr(m_src, m_pos, n) != word)
         return Fail("bad literal");
      m_pos += n;
      return true;
     }
   void              Add(const string key, const string val, const int type)
     {
      //--- a repeated key: the last one wins, as in Python's json / msgspec
      for(int i = 0; i < m_count; i++)
         if(m_keys[i] == key)
           {
            m_vals[i] = val;
            m_types[i] = type;
            return;
           }
      if(m_count >= ArraySize(m_keys))
        {
         ArrayResize(m_keys, m_count + 16);
         ArrayResize(m_vals, m_count + 16);
         ArrayResize(m_types, m_count + 16);
        }
      m_keys[m_count] = key;
      m_vals[m_count] = val;
      m_types[m_count] = type;
      m_count++;
     }
   int               Find(const string key) const
     {
      for(int i = 0; i < m_count; i++)
         if(m_keys[i] == key)
            return i;
      return -1;
     }

public:
                     CTcJsonObject() : m_count(0), m_len(0), m_pos(0) {}

   string            Error() const { return m_error; }
   int               Count() const { return m_count; }

   bool              Parse(const string text)
     {
      m_count = 0;
      m_error = "";
      m_src = text;
      m_len = StringLen(text);
      m_pos = 0;
      SkipWs();
      if(Peek() != '{')
         return Fail("expected object");
      m_pos++;
      SkipWs();
      if(Peek() == '}')
        {
         m_pos++;
        }
      else
        {
         while(true)
           {
            SkipWs();
            string key;
            if(!ParseString(key))
               return false;
            SkipWs();
            if(Peek() != ':')
               return Fail("expected ':'");
            m_pos++;
            SkipWs();
            ushort c = Peek();
            if(c == '"')
              {
               string v;
               if(!ParseString(v))
                  return false;
               Add(key, v, TC_JSON_STRING);
              }
            else
               if(c == '{' || c == '[')
                 {
                  if(!SkipNested())
                     return false;
                  Add(key, "", TC_JSON_NESTED);
                 }
               else
                  if(c == 't')
                    {
                     if(!Literal("true"))
                        return false;
                     Add(key, "true", TC_JSON_BOOL);
                    }
                  else
                     if(c == 'f')
                       {
                        if(!Literal("false"))
                           return false;
                        Add(key, "false", TC_JSON_BOOL);
                       }
                     else
                        if(c == 'n')
                          {
                           if(!Literal("null"))
                              return false;
                           Add(key, "", TC_JSON_NULL);
                          }
                        else
                          {
                           int start = m_pos;
                           while(m_pos < m_len)
                             {
                              ushort d = StringGetCharacter(m_src, m_pos);
                              if((d >= '0' && d <= '9') || d == '-' || d == '+' || d == '.' || d == 'e' || d == 'E')
                                 m_pos++;
                              else
                                 break;
                             }
                           if(m_pos == start)
                              return Fail("unexpected character");
                           Add(key, StringSubstr(m_src, start, m_pos - start), TC_JSON_NUMBER);
                          }
            SkipWs();
            c = Peek();
            if(c == ',')
              {
               m_pos++;
               continue;
              }
            if(c == '}')
              {
               m_pos++;
               break;
              }
            return Fail("expected ',' or '}'");
           }
        }
      SkipWs();
      if(m_pos != m_len)
         return Fail("trailing data");
      return true;
     }

   bool              Has(const string key) const { return Find(key) >= 0; }
   bool              IsNull(const string key) const
     {
      int i = Find(key);
      return i < 0 || m_types[i] == TC_JSON_NULL;
     }
   string            Str(const string key, const string def = "") const
     {
      int i = Find(key);
      if(i < 0 || m_types[i] == TC_JSON_NULL || m_types[i] == TC_JSON_NESTED)
         return def;
      return m_vals[i];
     }
   double            Num(const string key, const double def = 0.0) const
     {
      int i = Find(key);
      if(i < 0 || m_types[i] != TC_JSON_NUMBER)
         return def;
      return TcParseDouble(m_vals[i]);
     }
   long              Int(const string key, const long def = 0) const
     {
      int i = Find(key);
      if(i < 0 || m_types[i] != TC_JSON_NUMBER)
         return def;
      string v = m_vals[i];
      //--- an integer written as a float (1e3, 5.0) still reads correctly
      if(StringFind(v, ".") >= 0 || StringFind(v, "e") >= 0 || StringFind(v, "E") >= 0)
         return (long)MathRound(TcParseDouble(v));
      return StringToInteger(v);
     }
   bool              Bool(const string key, const bool def = false) const
     {
      int i = Find(key);
      if(i < 0 || m_types[i] != TC_JSON_BOOL)
         return def;
      return m_vals[i] == "true";
     }
  };

#endif // TC_JSON_MQH
//+------------------------------------------------------------------+
